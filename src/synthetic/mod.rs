//! Synthetic identities, a small backbone and verification metrics for the training demo.
