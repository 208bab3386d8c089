//! The `sluice` command with the ops sluice ships (src/lib.rs is the command itself).

fn main() -> std::process::ExitCode {
    sluice_cli::main_with(sluice_cli::OpRegistry::builtin())
}
