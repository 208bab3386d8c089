//! `sluice bench --live`: a terminal view of a running load test, with keys that change
//! the load while it runs. Without a terminal it prints one line per second instead.

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Style, Stylize};
use ratatui::symbols::Marker;
use ratatui::text::Line;
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, Paragraph};
use ratatui::Frame;
use sluice_client::bench::Load;
use sluice_client::live::{describe, LiveReport, LiveRun, Second};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How the keys move the load.
#[derive(Clone, Copy)]
pub struct Keys {
    /// Added or taken per up/down key (open loop; closed loop moves by 1).
    pub rate_step: f64,
    /// Multiplied or divided by per `*` and `/`.
    pub factor: f64,
}

/// What a key does to the load (or to the run), as logged.
#[derive(Debug, PartialEq)]
enum Action {
    Load(Load),
    Pause(bool),
    Mark,
    Quit,
    Nothing,
}

/// The most the keys go to: far past what one client process can offer.
const MAX_RATE: f64 = 1e6;
const MAX_CONCURRENCY: usize = 10_000;

fn action(code: KeyCode, mods: KeyModifiers, load: Load, paused: bool, keys: Keys) -> Action {
    let scale = |f: f64| match load {
        Load::Open { rate, poisson } => Load::Open { rate: (rate * f).clamp(0.1, MAX_RATE), poisson },
        Load::Closed(n) => Load::Closed(((n as f64 * f).round() as usize).clamp(1, MAX_CONCURRENCY)),
    };
    let add = |up: bool| match load {
        Load::Open { rate, poisson } => {
            let rate = if up { rate + keys.rate_step } else { rate - keys.rate_step };
            Load::Open { rate: rate.clamp(0.1, MAX_RATE), poisson }
        }
        Load::Closed(n) => Load::Closed(if up { n + 1 } else { n.saturating_sub(1) }.clamp(1, MAX_CONCURRENCY)),
    };
    match code {
        KeyCode::Char('c') if mods.contains(KeyModifiers::CONTROL) => Action::Quit,
        KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
        KeyCode::Up | KeyCode::Char('+') | KeyCode::Char('k') => Action::Load(add(true)),
        KeyCode::Down | KeyCode::Char('-') | KeyCode::Char('j') => Action::Load(add(false)),
        KeyCode::Char('*') => Action::Load(scale(keys.factor)),
        KeyCode::Char('/') => Action::Load(scale(1.0 / keys.factor)),
        KeyCode::Char('p') => match load {
            Load::Open { rate, poisson } => Action::Load(Load::Open { rate, poisson: !poisson }),
            Load::Closed(_) => Action::Nothing,
        },
        KeyCode::Char(' ') => Action::Pause(!paused),
        KeyCode::Char('m') => Action::Mark,
        _ => Action::Nothing,
    }
}

/// What the view shows besides the run.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub title: &'a str,
    pub slo_ms: Option<f64>,
    /// The sliding window of the percentiles, in seconds.
    pub window_s: u64,
}

/// Runs the terminal view until the user quits (or `limit` passes).
pub async fn tui(run: &LiveRun, view: View<'_>, keys: Keys, limit: Option<Duration>) {
    let started = Instant::now();
    // Keys are read on a thread of their own: crossterm's read blocks.
    let (tx, mut rx) = mpsc::channel(64);
    let reader = std::thread::spawn(move || loop {
        match event::poll(Duration::from_millis(100)) {
            Ok(true) => match event::read() {
                Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => {
                    if tx.blocking_send((k.code, k.modifiers)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            },
            Ok(false) if tx.is_closed() => return,
            Ok(false) => {}
            Err(_) => return,
        }
    });
    let mut terminal = ratatui::init();
    let mut redraw = tokio::time::interval(Duration::from_millis(250));
    let mut marks = 0;
    loop {
        tokio::select! {
            _ = redraw.tick() => {}
            key = rx.recv() => {
                let Some((code, mods)) = key else { break };
                let (load, paused) = run.load();
                match action(code, mods, load, paused, keys) {
                    Action::Load(l) => run.set_load(l),
                    Action::Pause(p) => run.set_paused(p),
                    Action::Mark => {
                        marks += 1;
                        run.mark(&format!("#{marks}"));
                    }
                    Action::Quit => break,
                    Action::Nothing => {}
                }
            }
        }
        if limit.is_some_and(|l| started.elapsed() >= l) {
            break;
        }
        let _ = terminal.draw(|f| draw(f, run, view, started.elapsed()));
    }
    ratatui::restore();
    drop(rx);
    let _ = reader.join();
}

/// One line per second on stderr (stdout keeps the report), for pipes and CI, until
/// `limit` passes or SIGINT.
pub async fn lines(run: &LiveRun, limit: Duration) {
    let started = Instant::now();
    let mut printed = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while started.elapsed() < limit {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut ctrl_c => break,
        }
        let seconds = run.seconds();
        for s in &seconds[printed..] {
            eprintln!("{}", second_line(s));
        }
        printed = seconds.len();
    }
}

fn ms(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.1}"))
}

/// "t=12s rate 100/s (even): offered 100/s achieved 99/s errors 0 p50 2.1 p90 3.0 p99 5.2 ms ..."
pub fn second_line(s: &Second) -> String {
    format!(
        "t={}s {}{}: offered {}/s achieved {}/s errors {} p50 {} p90 {} p99 {} ms; server queue {} compute {} ms; in flight {}",
        s.at_s,
        describe(&s.load),
        if s.paused { " (paused)" } else { "" },
        s.offered,
        s.achieved,
        s.errors,
        ms(s.p50_ms),
        ms(s.p90_ms),
        ms(s.p99_ms),
        ms(s.server_queue_ms),
        ms(s.server_compute_ms),
        s.in_flight
    )
}

/// Seconds of history the charts show.
const SHOWN_S: f64 = 180.0;

fn draw(f: &mut Frame, run: &LiveRun, view: View<'_>, elapsed: Duration) {
    let (title, slo_ms) = (view.title, view.slo_ms);
    let seconds = run.seconds();
    let changes = run.changes();
    let (load, paused) = run.load();
    let (sent, ok, failed) = run.totals();
    let [head, charts, log, help] =
        Layout::vertical([Constraint::Length(5), Constraint::Min(8), Constraint::Length(7), Constraint::Length(1)])
            .areas(f.area());
    let last = seconds.last();
    let state = if paused { "  PAUSED" } else { "" };
    let text = vec![
        Line::from(format!("load: {}{state}   t={:.0}s", describe(&load), elapsed.as_secs_f64())).bold(),
        Line::from(match last {
            Some(s) => format!(
                "offered {}/s  achieved {}/s  errors {}  p50 {}  p90 {}  p99 {} ms (last {} s)",
                s.offered,
                s.achieved,
                s.errors,
                ms(s.p50_ms),
                ms(s.p90_ms),
                ms(s.p99_ms),
                (seconds.len() as u64).min(view.window_s)
            ),
            None => "offered -  achieved -  (first second under way)".into(),
        }),
        Line::from(match last {
            Some(s) => format!(
                "server per request: queue {} ms  compute {} ms   in flight {}   sent {sent}  ok {ok}  failed {failed}",
                ms(s.server_queue_ms),
                ms(s.server_compute_ms),
                s.in_flight
            ),
            None => String::new(),
        }),
    ];
    f.render_widget(Paragraph::new(text).block(Block::bordered().title(format!(" sluice bench {title} "))), head);

    let [rates, p99s] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(charts);
    let now = seconds.last().map_or(0.0, |s| s.at_s as f64);
    let from = (now - SHOWN_S).max(0.0);
    let shown: Vec<&Second> = seconds.iter().filter(|s| s.at_s as f64 >= from).collect();
    let offered: Vec<(f64, f64)> = shown.iter().map(|s| (s.at_s as f64, s.offered as f64)).collect();
    let achieved: Vec<(f64, f64)> = shown.iter().map(|s| (s.at_s as f64, s.achieved as f64)).collect();
    let p99: Vec<(f64, f64)> = shown.iter().filter_map(|s| Some((s.at_s as f64, s.p99_ms?))).collect();
    let x_axis = || {
        Axis::default()
            .bounds([from, now.max(from + 10.0)])
            .labels([format!("{from:.0}s"), format!("{:.0}s", now.max(from + 10.0))])
    };
    let top = |pts: &[(f64, f64)]| pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let rate_max = top(&offered).max(top(&achieved));
    fn line<'a>(name: &'static str, pts: &'a [(f64, f64)], color: Color) -> Dataset<'a> {
        Dataset::default()
            .name(name)
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(Style::new().fg(color))
            .data(pts)
    }
    f.render_widget(
        Chart::new(vec![line("offered", &offered, Color::Cyan), line("achieved", &achieved, Color::Green)])
            .block(Block::bordered().title(" requests/s "))
            .x_axis(x_axis())
            .y_axis(Axis::default().bounds([0.0, rate_max]).labels(["0".to_string(), format!("{rate_max:.0}")])),
        rates,
    );
    let slo_line: Vec<(f64, f64)> = slo_ms.map_or(Vec::new(), |s| vec![(from, s), (now.max(from + 10.0), s)]);
    let p99_max = top(&p99).max(slo_ms.unwrap_or(0.0) * 1.2);
    let mut sets = vec![line("p99", &p99, Color::Red)];
    if !slo_line.is_empty() {
        sets.push(line("slo", &slo_line, Color::Yellow));
    }
    f.render_widget(
        Chart::new(sets)
            .block(Block::bordered().title(" p99 ms "))
            .x_axis(x_axis())
            .y_axis(Axis::default().bounds([0.0, p99_max]).labels(["0".to_string(), format!("{p99_max:.0}")])),
        p99s,
    );
    let lines: Vec<Line> =
        changes.iter().rev().take(5).rev().map(|c| Line::from(format!("{:7.1}s  {}", c.at_s, c.what))).collect();
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(" changes ")), log);
    f.render_widget(
        Paragraph::new("up/+ more  down/- less  * double  / halve  p poisson/even  space pause  m mark  q quit")
            .style(Style::new().fg(Color::DarkGray)),
        help,
    );
}

/// The exit report: segments as the usual table (`table`, plain or Markdown) with the
/// second each began, the changes, the knee, the totals.
pub fn summary(report: &LiveReport, table: &str, slo_ms: Option<f64>) -> String {
    let mut out = String::new();
    let mut starts = report.segment_starts.iter();
    for (i, line) in table.lines().enumerate() {
        let cell = match (i, line.starts_with('|')) {
            (0, md) => "from_s".to_string() + if md { " |" } else { "" },
            (1, true) => "---|".into(),
            (_, md) => format!("{:.1}", starts.next().copied().unwrap_or(0.0)) + if md { " |" } else { "" },
        };
        match line.strip_prefix('|') {
            Some(rest) => out.push_str(&format!("| {cell}{rest}\n")),
            None => out.push_str(&format!("{cell:>6}  {line}\n")),
        }
    }
    out.push_str("\nchanges:\n");
    if report.changes.is_empty() {
        out.push_str("  none\n");
    }
    for c in &report.changes {
        out.push_str(&format!("  {:7.1}s  {}\n", c.at_s, c.what));
    }
    out.push_str(&format!("\nsent {}, ok {}, failed {}\n", report.sent, report.ok, report.errors));
    if let Some(slo) = slo_ms {
        match report.knee(slo) {
            Some(k) => out.push_str(&format!(
                "knee: {} held p99 {:.1} ms <= {slo} ms at {:.1} req/s\n",
                describe(&k.load),
                k.p99_ms,
                k.throughput
            )),
            None => out.push_str(&format!("knee: no load held p99 <= {slo} ms without errors\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_move_the_load() {
        let keys = Keys { rate_step: 5.0, factor: 2.0 };
        let none = KeyModifiers::NONE;
        let open = Load::Open { rate: 50.0, poisson: false };
        assert_eq!(
            action(KeyCode::Up, none, open, false, keys),
            Action::Load(Load::Open { rate: 55.0, poisson: false })
        );
        assert_eq!(
            action(KeyCode::Char('*'), none, open, false, keys),
            Action::Load(Load::Open { rate: 100.0, poisson: false })
        );
        assert_eq!(
            action(KeyCode::Char('p'), none, open, false, keys),
            Action::Load(Load::Open { rate: 50.0, poisson: true })
        );
        assert_eq!(action(KeyCode::Char(' '), none, open, false, keys), Action::Pause(true));
        assert_eq!(action(KeyCode::Char('c'), KeyModifiers::CONTROL, open, false, keys), Action::Quit);
        let low = Load::Open { rate: 1.0, poisson: false };
        assert_eq!(
            action(KeyCode::Down, none, low, false, keys),
            Action::Load(Load::Open { rate: 0.1, poisson: false })
        );
        assert_eq!(action(KeyCode::Down, none, Load::Closed(1), false, keys), Action::Load(Load::Closed(1)));
        assert_eq!(action(KeyCode::Char('/'), none, Load::Closed(8), false, keys), Action::Load(Load::Closed(4)));
        assert_eq!(action(KeyCode::Char('p'), none, Load::Closed(8), false, keys), Action::Nothing);
    }
}
