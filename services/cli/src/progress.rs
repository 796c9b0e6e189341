//! Progress bars for transfers, drawn on stderr only when it is a terminal.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One bar per file transfer.
#[derive(Debug, Default)]
pub(crate) struct Bars {
    current: Mutex<Option<ProgressBar>>,
}

impl patchport_client::Progress for Bars {
    fn start(&self, label: &str, total: u64) {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.to_owned());
        if let Ok(mut cur) = self.current.lock() {
            *cur = Some(bar);
        }
    }

    fn advance(&self, n: u64) {
        if let Ok(cur) = self.current.lock()
            && let Some(bar) = cur.as_ref()
        {
            bar.inc(n);
        }
    }

    fn finish(&self) {
        if let Ok(mut cur) = self.current.lock()
            && let Some(bar) = cur.take()
        {
            bar.finish_and_clear();
        }
    }
}
