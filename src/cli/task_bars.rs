//! The CLI's [`ferrotune::progress::Reporter`]: each library task is a bar on stderr (a
//! spinner while its total is unknown). indicatif draws nothing when stderr is not a
//! terminal, so logs and `--json` output stay clean.

use ferrotune::progress::{Reporter, TaskView};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

pub struct TaskBars;

struct Bar(ProgressBar);

fn style(known_total: bool) -> ProgressStyle {
    let t = if known_total {
        "{msg} {bar:30} {pos}/{len} ({elapsed}, ETA {eta})"
    } else {
        "{msg} {spinner} ({elapsed})"
    };
    ProgressStyle::with_template(t).expect("valid template")
}

impl Reporter for TaskBars {
    fn start(&self, what: &str, total: u64) -> Box<dyn TaskView> {
        let bar = ProgressBar::new(total)
            .with_style(style(total > 0))
            .with_message(what.to_string());
        if total == 0 {
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Box::new(Bar(bar))
    }
}

impl TaskView for Bar {
    fn set_total(&self, total: u64) {
        if self.0.length() != Some(total) {
            if self.0.length() == Some(0) && total > 0 {
                self.0.disable_steady_tick();
                self.0.set_style(style(true));
            }
            self.0.set_length(total);
        }
    }
    fn set_done(&self, done: u64) {
        self.0.set_position(done);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}
