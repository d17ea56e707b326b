//! Webhook delivery (work in progress).
