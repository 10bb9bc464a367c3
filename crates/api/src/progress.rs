//! The image build's progress as text lines, for the page: a
//! [`MultiProgress`] that draws into a virtual screen instead of a terminal.
//! The bars are the CLI's own (`sandpen_image::build` makes them), so the
//! page shows the steps the CLI shows.

use std::sync::{Arc, Mutex};

use indicatif::{MultiProgress, ProgressDrawTarget, TermLike};

/// Lines drawn so far, the latest state of each progress line.
#[derive(Debug, Clone, Default)]
pub struct Lines(Arc<Mutex<Screen>>);

#[derive(Debug, Default)]
struct Screen {
    lines: Vec<String>,
    row: usize,
}

impl Lines {
    /// A progress whose bars draw into these lines.
    pub fn progress(&self) -> MultiProgress {
        MultiProgress::with_draw_target(ProgressDrawTarget::term_like_with_hz(
            Box::new(self.clone()),
            4,
        ))
    }

    /// The lines now, without styling, empty ones left out.
    pub fn snapshot(&self) -> Vec<String> {
        let screen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        screen
            .lines
            .iter()
            .map(|l| strip_ansi(l).trim_end().to_string())
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// Adds a line of its own (a note said before a build).
    pub fn say(&self, text: &str) {
        let mut screen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Above the bars: indicatif redraws them below the cursor.
        let row = screen.row;
        screen.lines.insert(row, text.to_string());
        screen.row += 1;
    }

    fn with(&self, f: impl FnOnce(&mut Screen)) -> std::io::Result<()> {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(())
    }
}

impl Screen {
    fn line(&mut self) -> &mut String {
        while self.lines.len() <= self.row {
            self.lines.push(String::new());
        }
        &mut self.lines[self.row]
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if !c.is_control() {
            out.push(c);
        }
    }
    out
}

impl TermLike for Lines {
    fn width(&self) -> u16 {
        100
    }
    fn height(&self) -> u16 {
        60
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        self.with(|s| s.row = s.row.saturating_sub(n))
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        self.with(|s| s.row += n)
    }
    fn move_cursor_right(&self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, line: &str) -> std::io::Result<()> {
        self.with(|s| {
            s.line().push_str(line);
            s.row += 1;
        })
    }
    fn write_str(&self, text: &str) -> std::io::Result<()> {
        self.with(|s| s.line().push_str(text))
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.with(|s| s.line().clear())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_show_as_their_latest_lines() {
        let lines = Lines::default();
        let progress = lines.progress();
        lines.say("building the default image");
        let a = progress.add(indicatif::ProgressBar::new(10));
        a.set_style(indicatif::ProgressStyle::with_template("{prefix} {msg}").unwrap());
        a.set_prefix("debootstrap");
        a.set_message("\u{1b}[2mfetching\u{1b}[0m");
        a.tick();
        let b = progress.add(indicatif::ProgressBar::new(10));
        b.set_style(indicatif::ProgressStyle::with_template("{prefix} {msg}").unwrap());
        b.set_prefix("kernel");
        b.finish_with_message("done");
        a.finish_with_message("done");
        let snap = lines.snapshot();
        assert_eq!(snap[0], "building the default image");
        assert!(snap.contains(&"debootstrap done".to_string()), "{snap:?}");
        assert!(snap.contains(&"kernel done".to_string()), "{snap:?}");
        assert_eq!(snap.len(), 3, "{snap:?}");
    }
}
