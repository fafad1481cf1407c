//! `remus-restore`: write a guest's memory image at any committed epoch.

use std::process::ExitCode;

use clap::Parser;
use remus_cli::cmd::restore::{run, RestoreArgs};

fn main() -> ExitCode {
    remus_sys::keep_freed_memory();
    remus_sys::die_on_closed_pipe();
    let args = RestoreArgs::parse();
    remus_cli::init_logging(false);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remus-restore: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
