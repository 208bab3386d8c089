//! The `sluice` command with one more op: everything `sluice` does (`serve`, `check`,
//! `graph`, `ops`, ...), and pipelines may use `normalize_boxes`.

fn main() -> std::process::ExitCode {
    sluice_cli::main_with(sluice_example_custom_op::registry())
}
