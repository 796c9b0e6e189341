//! One module per command family.

pub(crate) mod eval;
pub(crate) mod info;
pub(crate) mod port;
pub(crate) mod pull;
pub(crate) mod push;
pub(crate) mod serve;
pub(crate) mod worker;

/// Connects to the registry named by `--registry` / `PATCHPORT_REGISTRY`.
pub(crate) async fn connect(url: &str) -> anyhow::Result<patchport_client::Client> {
    Ok(patchport_client::Client::connect(url).await?)
}
