//! Thread utilities the rest of the server builds on.

pub mod priority;
