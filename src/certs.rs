//! `portunus certs list` and `portunus certs renew NAME`.

use std::path::Path;

use anyhow::{Context, bail};
use http::{Method, StatusCode};
use portunus_store::{CertStorage, FsStorage, INTERNAL_CA_KEY};

use crate::admin::call;
use crate::config;
use crate::workers::runtime;

fn when(secs: Option<u64>) -> String {
    secs.map(|s| {
        let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(s).unwrap_or(0))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        )
    })
    .unwrap_or_else(|| "-".to_owned())
}

/// Prints certificates: from the running instance's admin API, else from the store.
pub fn list(path: &Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    runtime()?.block_on(async {
        if let Some(addr) = config.listen.admin {
            match call(
                addr,
                Method::GET,
                "/status",
                config.listen.admin_token.as_deref(),
            )
            .await
            {
                Ok((StatusCode::OK, body)) => {
                    let doc: serde_json::Value =
                        serde_json::from_str(&body).context("the admin API answered non-JSON")?;
                    println!(
                        "{:<40} {:<9} {:<22} {:<22} LAST ERROR",
                        "NAME", "SOURCE", "NOT AFTER", "NEXT RENEWAL"
                    );
                    for c in doc["certificates"].as_array().into_iter().flatten() {
                        println!(
                            "{:<40} {:<9} {:<22} {:<22} {}",
                            c["name"].as_str().unwrap_or("?"),
                            c["source"].as_str().unwrap_or("?"),
                            when(c["not_after"].as_u64()),
                            when(c["next_renewal"].as_u64()),
                            c["last_error"].as_str().unwrap_or("-"),
                        );
                    }
                    return Ok(());
                }
                Ok((status, body)) => bail!("the admin API answered {status}: {body}"),
                Err(e) => eprintln!("{e:#}; reading the store instead"),
            }
        }
        let storage = FsStorage::open(&config.storage).context("storage directory")?;
        let acme_ca = config.acme.config().ca_key()?;
        println!("{:<40} {:<9} {:<22} ISSUER", "NAME", "SOURCE", "NOT AFTER");
        for (ca, source) in [(acme_ca.as_str(), "acme"), (INTERNAL_CA_KEY, "internal")] {
            for name in storage.list(ca).await? {
                match storage.load(ca, &name).await {
                    Ok(Some(stored)) => println!(
                        "{:<40} {:<9} {:<22} {}",
                        name,
                        source,
                        when(Some(stored.info.not_after)),
                        stored.info.issuer
                    ),
                    Ok(None) => {}
                    Err(e) => println!("{name:<40} {source:<9} unreadable: {e}"),
                }
            }
        }
        Ok(())
    })
}

/// Asks the running instance to renew the certificate covering `name`.
pub fn renew(path: &Path, name: &str) -> anyhow::Result<()> {
    let config = config::load(path)?;
    let Some(addr) = config.listen.admin else {
        bail!("renewing needs the admin API of the running instance: set listen.admin");
    };
    runtime()?.block_on(async {
        let target = format!("/certs/{name}/renew");
        match call(
            addr,
            Method::POST,
            &target,
            config.listen.admin_token.as_deref(),
        )
        .await?
        {
            (StatusCode::ACCEPTED, _) => {
                println!("{name}: renewal started (see `portunus certs list`)");
                Ok(())
            }
            (status, body) => bail!("{name}: the admin API answered {status}: {body}"),
        }
    })
}
