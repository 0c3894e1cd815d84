//! The `spotbuild` binary: everything lives in the library; this only hands over.

fn main() -> std::process::ExitCode {
    // Docker runs this binary as its credential helper during agent builds.
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    let name = argv0.rsplit('/').next();
    if name == Some(spotbuild::agent::CREDENTIAL_HELPER) {
        let code = spotbuild::agent::credential_helper(args.next().as_deref());
        return std::process::ExitCode::from(code as u8);
    }
    // The reaper's Lambda function (provided.al2023 runs `bootstrap`).
    if name == Some("bootstrap") {
        return spotbuild::cli::lambda_main();
    }
    spotbuild::cli::main()
}
