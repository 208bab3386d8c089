//! `sluice bench --live` in a real terminal: tmux runs it against a real server, keys are
//! sent with send-keys and the screen is read with capture-pane.

use sluice_tests::{affine_model, metric, start, Repo};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A tmux server of the test's own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        Tmux { socket: format!("sluice-live-test-{}", std::process::id()) }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs (scripts/setup.sh installs it)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "live"]).stdout).into_owned()
    }

    /// Everything the pane printed, wrapped lines joined (the exit table is wide).
    fn history(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-J", "-S", "-", "-t", "live"]).stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        assert!(self.run(&["send-keys", "-t", "live", keys]).status.success());
    }

    /// Waits until the screen satisfies `ok`; returns that screen.
    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(Instant::now() < until, "timed out waiting for {what}; the screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The number after `label ` on the screen, e.g. "offered 50/s" -> 50.
fn number_after(screen: &str, label: &str) -> Option<f64> {
    let rest = screen.split(&format!("{label} ")).nth(1)?;
    rest.split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_follows_the_keys_and_the_exit_table_has_the_change_points() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 8\n");
    let s = start(repo.config()).await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("live.json");
    let plot = dir.path().join("live.svg");
    let command = format!(
        "{} bench affine --live --rate 50 --p99-slo 50 --url http://{} --out {} --plot {}",
        env!("CARGO_BIN_EXE_sluice"),
        s.server.grpc_addr,
        json.display(),
        plot.display()
    );
    let tmux = Tmux::new();
    let started = tmux.run(&["new-session", "-d", "-s", "live", "-x", "150", "-y", "45", &command]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    // Keep the pane when the command exits, to read the exit table from it.
    tmux.run(&["set-option", "-t", "live", "remain-on-exit", "on"]);

    let tmux = tokio::task::spawn_blocking(move || {
        let screen = tmux.wait_for("the first seconds at 50/s", |s| {
            s.contains("load: rate 50/s (even)") && number_after(s, "offered").is_some_and(|o| o >= 40.0)
        });
        let offered = number_after(&screen, "offered").unwrap();
        assert!((40.0..=60.0).contains(&offered), "offered {offered}/s at a rate of 50/s:\n{screen}");

        tmux.keys("Up");
        tmux.wait_for("the rate one step up", |s| s.contains("load: rate 55/s (even)"));
        std::thread::sleep(Duration::from_millis(1500));
        tmux.keys("*");
        tmux.wait_for("the rate doubled", |s| s.contains("load: rate 110/s (even)"));
        // Two whole seconds at the new rate: the offered rate shown follows.
        std::thread::sleep(Duration::from_millis(2500));
        let screen = tmux.wait_for("about 110/s offered and answered", |s| {
            let (o, a) = (number_after(s, "offered"), number_after(s, "achieved"));
            o.is_some_and(|o| (95.0..=125.0).contains(&o)) && a.is_some_and(|a| (90.0..=130.0).contains(&a))
        });
        assert!(screen.contains("rate 55/s (even) -> rate 110/s (even)"), "the change is logged:\n{screen}");
        tmux.keys("m");
        // Paused: nothing offered; resumed: the same load again.
        tmux.keys("Space");
        tmux.wait_for("a paused second", |s| s.contains("PAUSED") && s.contains("offered 0/s"));
        tmux.keys("Space");
        tmux.wait_for("the load again", |s| {
            !s.contains("PAUSED") && number_after(s, "offered").is_some_and(|o| o > 90.0)
        });
        tmux.keys("q");
        tmux
    })
    .await
    .unwrap();

    // The exit table: one row per load, the changes, the knee.
    let until = Instant::now() + Duration::from_secs(20);
    while !json.exists() {
        assert!(Instant::now() < until, "no report written; the screen:\n{}", tmux.screen());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tmux.wait_for("the exit table", |s| s.contains("knee:"));
    let screen = tmux.history();
    for line in
        ["changes:", "rate 50/s (even) -> rate 55/s (even)", "rate 55/s (even) -> rate 110/s (even)", "mark: #1"]
    {
        assert!(screen.contains(line), "the exit table lacks '{line}':\n{screen}");
    }
    let rows = screen.lines().skip_while(|l| !l.contains("from_s")).skip(1).take_while(|l| !l.trim().is_empty());
    let starts: Vec<f64> = rows.filter_map(|r| r.split_whitespace().next()?.parse().ok()).collect();
    // 50/s, 55/s, 110/s, and 110/s again after the pause (the paused stretch is no row).
    assert_eq!(starts.len(), 4, "one row per load, after the second it began:\n{screen}");
    assert!(
        starts[0] == 0.0 && starts[1] > 0.5 && starts[2] > starts[1] + 1.0 && starts[3] > starts[2] + 2.0,
        "{starts:?}"
    );

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["segments"].as_array().unwrap().len(), 4, "{report}");
    assert_eq!(report["changes"].as_array().unwrap().len(), 5, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let (sent, ok) = (report["sent"].as_u64().unwrap(), report["ok"].as_u64().unwrap());
    assert_eq!(sent, ok, "every request sent was answered before the exit");
    // What the bench counted is what the server counted.
    let served = metric(&s.http, "sluice_requests_total", &["model=\"affine\""]).await;
    assert_eq!(served as u64, ok, "the server's request count");
    assert!(report["knee"]["throughput"].as_f64().unwrap() > 90.0, "the tiny model holds 110/s within 50 ms: {report}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("rate 55/s (even) -&gt; rate 110/s (even)") || svg.contains("rate 55/s (even) -> rate 110/s"));
    assert!(Path::new(&plot).exists());
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_terminal_it_prints_a_line_per_second_and_stops_on_its_own() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 8\n");
    let s = start(repo.config()).await;
    let url = format!("http://{}", s.server.grpc_addr);
    let bin = env!("CARGO_BIN_EXE_sluice");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["bench", "affine", "--live", "--rate", "20", "--duration", "3.5", "--url", &url])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    // A line per second on stderr; the report on stdout.
    for t in 1..=3 {
        assert!(stderr.contains(&format!("t={t}s rate 20/s (even): offered ")), "no line for second {t}:\n{stderr}");
    }
    let offered: Vec<f64> =
        stderr.lines().filter(|l| l.starts_with("t=")).filter_map(|l| number_after(l, "offered")).collect();
    assert!(offered.iter().skip(1).all(|o| (15.0..=25.0).contains(o)), "{offered:?}\n{stderr}");
    assert!(stdout.contains("changes:\n  none") && !stdout.contains("t=1s"), "{stdout}");

    let bad = Command::new(bin).args(["bench", "m", "--live", "--rate", "10,20"]).output().unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--live starts from one positive --rate or --concurrency"));
    s.server.shutdown().await;
}
