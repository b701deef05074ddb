use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = fwgate::cli::Cli::parse();
    match fwgate::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Errors quote the server and the device: no control character reaches the terminal.
            eprintln!("error: {}", fwgate::shown(&format!("{e:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}
