//! Maglev consistent hashing (placeholder, see tests).
