//! `xpyd keys`: API keys in the local key store (`$XPYD_STATE_DIR/keys`, else the user
//! data directory's `xpyd/keys`). A secret is printed once, at `create`; the store keeps
//! only its keyed hash. Coordinators of services with `auth: api_key` read the same
//! store and see changes within a second.

use crate::exit::UsageError;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use xpyd_coordinator::keys::{KeyError, Store, default_dir};

/// `xpyd keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create a key and print its secret (shown only this once).
    Create {
        /// Unique name.
        #[arg(long)]
        name: String,
        /// Bind it to these services (comma-separated manifest names); default: all.
        #[arg(long, value_delimiter = ',')]
        services: Vec<String>,
        /// An admin key: it also opens the operations endpoints.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List keys: names, scopes, creation and last use — never secrets.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Bind keys to services (all of them in one write).
    Bind(BindArgs),
    /// Unbind keys from services; a key bound to nothing is valid for every service.
    Unbind(BindArgs),
    /// Delete a key (a key bound to a service must be unbound first).
    Delete {
        /// The key.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Where the store is.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Key store directory (default: $XPYD_STATE_DIR/keys or the user data directory).
    #[arg(long, conflicts_with = "file")]
    dir: Option<PathBuf>,
    /// Or the store of this manifest's cluster: in etcd when its registry is etcd (over
    /// TLS trusting `registry.ca` or the cluster's CA), else the directory.
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
}

impl StoreArgs {
    fn store(&self) -> Result<Store> {
        let Some(f) = &self.file else {
            return Ok(Store::new(self.dir.clone().unwrap_or_else(default_dir)));
        };
        let m = crate::manifest::Manifest::load(f)?;
        let ca = crate::supervisor::tls_plan::tls_dir(&m.name).join("ca.pem");
        let cluster = if m.tls.internal && ca.exists() {
            Some(xpyd_runtime::tls::Roots::load(&ca)?)
        } else {
            None
        };
        crate::roles::key_store(&m, f, cluster.as_ref())
    }
}

/// Keys and services of `bind`/`unbind`.
#[derive(Debug, Args)]
pub struct BindArgs {
    /// Key names, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    names: Vec<String>,
    /// Services, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    services: Vec<String>,
    #[command(flatten)]
    store: StoreArgs,
}

fn usage(e: KeyError) -> anyhow::Error {
    match e {
        KeyError::Io { .. } => e.into(),
        other => UsageError(other.to_string()).into(),
    }
}

fn when(unix: u64) -> String {
    xpyd_runtime::events::format_rfc3339(unix * 1000)
}

/// Runs `xpyd keys …`.
///
/// # Errors
/// A bad name, an unknown or bound key ([`UsageError`]), or the store's I/O.
pub fn run(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Create {
            name,
            services,
            admin,
            store,
        } => {
            let secret = store
                .store()?
                .create(&name, &services, admin)
                .map_err(usage)?;
            println!("{secret}");
            eprintln!("key `{name}` created; this is the only time its secret is shown");
        }
        KeysCmd::List { json, store } => {
            let keys = store.store()?.list().map_err(usage)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<6} {:<28} {:<22} LAST USED",
                "NAME", "ADMIN", "SERVICES", "CREATED"
            );
            for k in keys {
                let services = if k.services.is_empty() {
                    "(all)".to_string()
                } else {
                    k.services.join(",")
                };
                println!(
                    "{:<24} {:<6} {:<28} {:<22} {}",
                    k.name,
                    if k.admin { "yes" } else { "no" },
                    services,
                    when(k.created_unix),
                    k.last_used_unix.map_or_else(|| "never".into(), when)
                );
            }
        }
        KeysCmd::Bind(b) => b
            .store
            .store()?
            .bind(&b.names, &b.services)
            .map_err(usage)?,
        KeysCmd::Unbind(b) => b
            .store
            .store()?
            .unbind(&b.names, &b.services)
            .map_err(usage)?,
        KeysCmd::Delete { name, store } => store.store()?.delete(&name).map_err(usage)?,
    }
    Ok(())
}
