use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = fwgate::cli::Cli::parse();
    match fwgate::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
