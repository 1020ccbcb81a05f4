//! The `shuttle` command: parse flags, load the config, run the loop.

use std::process::ExitCode;

use shuttle::cli::{self, Command};
use shuttle::control::info::Started;
use shuttle::model::config::one_line;
use shuttle::runtime::logsink;
use shuttle::startup::{check, start, Failed};

fn main() -> ExitCode {
    let flags = match cli::parse(std::env::args().skip(1).collect()) {
        Ok(Command::Run(flags)) => flags,
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("shuttle {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("shuttle: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    // Taken first: `GET /_info` reports when the process started.
    let started = Started::now();
    logsink::init(flags.debug);
    if flags.check {
        let checked = check(&flags);
        logsink::flush();
        return match checked {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(Failed(message)) => {
                eprintln!("shuttle: {}", one_line(&message));
                ExitCode::FAILURE
            }
        };
    }
    let result = start(flags, started)
        .and_then(|mut server| server.run().map_err(|e| Failed(format!("event loop failed: {e}"))));
    logsink::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed(message)) => {
            // Control characters (a newline in a config key, say) are escaped: always one line.
            eprintln!("shuttle: {}", one_line(&message));
            ExitCode::FAILURE
        }
    }
}
