//! Checkpoint loaders: the original pickle and safetensors.
