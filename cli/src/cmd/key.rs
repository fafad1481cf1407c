//! `remus key`: the key file that encrypts the S3 history before it
//! leaves the backup (`[s3] encryption-keys`): create it, rotate it (a new
//! key encrypts from then on, the older ones still decrypt), list it.

use std::path::PathBuf;

use anyhow::Result;
use remus_store::s3::Keyring;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: KeyAction,
}

/// `remus key` actions.
#[derive(Debug, clap::Subcommand)]
pub enum KeyAction {
    /// Add a fresh key to FILE (creating it, mode 600): it encrypts what
    /// is uploaded from now on; older keys still decrypt. Running backups
    /// take it up when restarted.
    New {
        /// The key file.
        file: PathBuf,
    },
    /// The key ids in FILE, and which one encrypts.
    List {
        /// The key file.
        file: PathBuf,
    },
}

/// Runs the command.
///
/// # Errors
/// For a key file that cannot be read or written, or is readable by
/// others.
pub fn run(args: &KeyArgs) -> Result<()> {
    match &args.action {
        KeyAction::New { file } => {
            let id = Keyring::add_key(file)?;
            println!(
                "key {id} added to {f}; it encrypts from now on. Set `encryption-keys = \"{f}\"` under [s3], and keep a copy of \
                 {f} apart from the backup site: without it the S3 history cannot be read.",
                f = file.display()
            );
        }
        KeyAction::List { file } => {
            let ring = Keyring::load(file)?;
            for id in ring.ids() {
                println!("key {id}{}", if id == ring.current() { " (encrypts)" } else { "" });
            }
        }
    }
    Ok(())
}
