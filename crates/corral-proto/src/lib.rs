//! Wire codecs for corral, with no I/O and no Python.
//!
//! Every parser here is a pure function over `&[u8]` that answers
//! [`Status::Complete`] with the value and the number of bytes it used,
//! [`Status::Partial`] when more input is needed, or an error that says what
//! was wrong. The engine owns the sockets and the buffers; this crate only
//! decides what the bytes mean.

pub mod http1;

/// The outcome of feeding a codec some bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status<T> {
    /// A whole value, and how many input bytes it used.
    Complete(T, usize),
    /// Not enough input yet; call again with more.
    Partial,
}
pub mod fastcgi;
pub mod proxy;
pub mod scgi;
pub mod uwsgi;
