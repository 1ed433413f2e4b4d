//! corral's server engine: listeners, connections, the worker event loop and
//! the master process that supervises workers.
//!
//! Nothing here knows about Python. An application plugs in through
//! [`App`]; the master's embedding (forking an interpreter, say) plugs in
//! through [`supervise::Hooks`]. The protocol codecs live in `corral-proto`.

pub mod access;
pub mod app;
pub mod cgi;
pub mod config;
pub mod crash;
pub mod daemon;
pub mod date;
pub mod exchange;
mod flusher;
pub mod forwarded;
mod gateway;
mod handover;
pub mod listen;
pub mod logfile;
mod nowait;
pub mod proctitle;
pub mod scoreboard;
pub mod static_files;
pub mod stats;
pub mod supervise;
pub mod systemd;
pub mod watch;
pub mod worker;

pub use app::{App, ListenerInfo, Meta, Request};
pub use config::Config;
pub use exchange::{BodyError, Exchange, ResponseError};
pub use handover::{name_pool, POOL_ENV};
pub use listen::{Addr, BindOptions, Listener, Protocol};
pub use supervise::{Hooks, Master};
pub use worker::{run_worker, WorkerCtx};
