//! `kt` run as a process against a real stack: every verb's table and JSON
//! output, exit codes, stdin input, `--follow` resuming from a printed
//! cursor, and `kt top` in a pseudo-terminal.

mod errors;
mod events;
mod operations;
mod support;
mod top;
mod triggers;
