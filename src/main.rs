//! The `spotbuild` binary: everything lives in the library; this only hands over.

fn main() -> std::process::ExitCode {
    // Docker runs this binary as its credential helper during agent builds.
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    if argv0.rsplit('/').next() == Some(spotbuild::agent::CREDENTIAL_HELPER) {
        let code = spotbuild::agent::credential_helper(args.next().as_deref());
        return std::process::ExitCode::from(code as u8);
    }
    spotbuild::cli::main()
}
