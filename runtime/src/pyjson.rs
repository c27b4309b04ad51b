//! Python-exact JSON (spec section 3).
