//! The `txbus` admin command line: `txbus --help`. See `txbus::cli`.

fn main() -> std::process::ExitCode {
    txbus::cli::main()
}
