//! The app tool list: Needle format and OpenAI-style definitions (spec section 3).
