//! Progress of long library work (converting a GGUF file, tokenizing datasets, loading
//! weights, generating answers) for the program that embeds the library to show. Library
//! code reports through [`task`]; a program installs one [`Reporter`] at start-up (the CLI
//! draws bars on stderr). Without one, reporting costs a branch and shows nothing.

use std::sync::{Arc, OnceLock};

/// Shows tasks; the program's side of [`task`].
pub trait Reporter: Send + Sync {
    /// A task named `what` of `total` units (0 when the total is not known yet).
    fn start(&self, what: &str, total: u64) -> Box<dyn TaskView>;
}

/// One task as a reporter shows it.
pub trait TaskView: Send + Sync {
    fn set_total(&self, total: u64);
    fn set_done(&self, done: u64);
    /// The task ended (successfully or not): stop showing it.
    fn finish(&self);
}

static REPORTER: OnceLock<Arc<dyn Reporter>> = OnceLock::new();

/// Installs the process's reporter; false when one was installed before (it stays).
pub fn set_reporter(r: Arc<dyn Reporter>) -> bool {
    REPORTER.set(r).is_ok()
}

/// A running task; dropping it ends it.
pub struct Task {
    view: Option<Box<dyn TaskView>>,
}

/// Starts a task named `what` of `total` units (0: unknown, shown as a spinner).
pub fn task(what: &str, total: u64) -> Task {
    Task {
        view: REPORTER.get().map(|r| r.start(what, total)),
    }
}

impl Task {
    pub fn set_total(&self, total: u64) {
        if let Some(v) = &self.view {
            v.set_total(total);
        }
    }

    pub fn set_done(&self, done: u64) {
        if let Some(v) = &self.view {
            v.set_done(done);
        }
    }

    /// A `(done, total)` callback, as [`crate::model::convert_gguf_with_progress`] takes.
    pub fn callback(&self) -> impl Fn(usize, usize) + '_ {
        move |done, total| {
            self.set_total(total as u64);
            self.set_done(done as u64);
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(v) = &self.view {
            v.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what it is told, each line prefixed with its task's name (other tests of
    /// this binary may run tasks at the same time).
    struct Log(Arc<Mutex<Vec<String>>>);
    struct View(String, Arc<Mutex<Vec<String>>>);

    impl Reporter for Log {
        fn start(&self, what: &str, total: u64) -> Box<dyn TaskView> {
            self.0.lock().unwrap().push(format!("{what}: start {total}"));
            Box::new(View(what.to_string(), self.0.clone()))
        }
    }
    impl TaskView for View {
        fn set_total(&self, total: u64) {
            self.1.lock().unwrap().push(format!("{}: total {total}", self.0));
        }
        fn set_done(&self, done: u64) {
            self.1.lock().unwrap().push(format!("{}: done {done}", self.0));
        }
        fn finish(&self) {
            self.1.lock().unwrap().push(format!("{}: finish", self.0));
        }
    }

    #[test]
    fn tasks_reach_the_installed_reporter_and_end_when_dropped() {
        let log = Arc::new(Mutex::new(Vec::new()));
        assert!(set_reporter(Arc::new(Log(log.clone()))));
        assert!(!set_reporter(Arc::new(Log(log.clone()))), "the first reporter stays");
        {
            let t = task("progress test", 0);
            (t.callback())(1, 3);
        }
        let mine: Vec<String> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("progress test: "))
            .cloned()
            .collect();
        assert_eq!(
            mine,
            [
                "progress test: start 0",
                "progress test: total 3",
                "progress test: done 1",
                "progress test: finish"
            ]
        );
    }
}
