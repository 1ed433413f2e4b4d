//! `corral._corral`: the native module behind the `corral` Python package.
//! It only registers what the other modules define.

mod cli;
mod config_file;
mod gunicorn_conf;
mod load;
mod logging;
mod runtime;
mod server_hooks;
mod shape;
mod traceback;
mod uwsgi_ini;
mod uwsgi_names;
mod wsgi;

use pyo3::prelude::*;

/// Runs the `corral` command with `argv` (program name first); returns the exit code.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    cli::main(py, argv)
}

#[pymodule]
fn _corral(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(logging::log_line, m)?)?;
    m.add_class::<wsgi::FileWrapper>()?;
    m.add_class::<wsgi::Input>()?;
    m.add_class::<wsgi::StartResponse>()?;
    m.add_class::<wsgi::Write>()?;
    m.add_class::<wsgi::ErrorStream>()?;
    m.add("ClientDisconnected", m.py().get_type::<wsgi::ClientDisconnected>())?;
    m.add("InvalidRequestBody", m.py().get_type::<wsgi::InvalidRequestBody>())?;
    Ok(())
}
