//! The environ of the last gateway request (uwsgi, FastCGI, SCGI) a serving
//! thread built, kept so that the next one with the same variables is a copy
//! with only the values that changed replaced.
//!
//! A front end sends the same variables in the same order for every request
//! of a location: nginx's `fastcgi_params`, then one per header field, and
//! clients of one kind send the same fields. Most values repeat as well
//! (DOCUMENT_ROOT, SERVER_SOFTWARE, the Host, the User-Agent). Building the
//! environ from nothing costs a Python string per value and a dict that
//! grows three times on the way to its forty entries; copying a dict of the
//! right size and replacing the two or three values that differ costs a
//! fraction of that, which is most of what the server itself spends on a
//! request behind nginx.
//!
//! The app gets the copy, never the kept dict: what it adds to or changes in
//! its environ does not reach the next request's.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

/// A kept environ and what it was built from.
pub struct Shape {
    pub listener: usize,
    pub https: bool,
    /// The variables' names, in the order the front end sent them.
    pub names: Vec<Box<[u8]>>,
    /// The value of each slot: the variables, then PATH_INFO and SCRIPT_NAME.
    pub values: Vec<Vec<u8>>,
    /// The environ key of each slot, one per value.
    pub keys: Vec<Py<PyString>>,
    /// The environ, `wsgi.input` set to None: a slot for the request's own,
    /// so that setting it in the copy does not grow the dict.
    pub dict: Py<PyDict>,
}

impl Shape {
    /// Whether a request with these variables has this shape: the same
    /// listener, scheme and names in the same order.
    pub fn fits<'a>(
        &self,
        listener: usize,
        https: bool,
        mut names: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> bool {
        self.listener == listener
            && self.https == https
            && names.len() == self.names.len()
            && self.names.iter().all(|n| names.next() == Some(&n[..]))
    }

    /// Puts `value` in slot `i`, unless it is there already: `make` gives its
    /// Python string. The kept value changes only once the dict holds the
    /// new one, so an error leaves the two agreeing.
    pub fn set<'py>(
        &mut self,
        py: Python<'py>,
        i: usize,
        value: &[u8],
        make: impl FnOnce() -> Bound<'py, PyString>,
    ) -> PyResult<()> {
        if self.values[i] == value {
            return Ok(());
        }
        self.dict.bind(py).set_item(self.keys[i].bind(py), make())?;
        let kept = &mut self.values[i];
        kept.clear();
        kept.extend_from_slice(value);
        Ok(())
    }

    /// The environ for the app: a copy.
    pub fn environ<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.dict.bind(py).copy()
    }
}
