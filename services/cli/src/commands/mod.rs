//! One module per command family.

pub(crate) mod admin;
pub(crate) mod eval;
pub(crate) mod health;
pub(crate) mod info;
pub(crate) mod port;
pub(crate) mod ports;
pub(crate) mod pull;
pub(crate) mod push;
pub(crate) mod serve;
pub(crate) mod sign;
pub(crate) mod worker;

/// The `--ca-cert` of this invocation (set once by `main`).
pub(crate) static CA_CERT: std::sync::OnceLock<Option<std::path::PathBuf>> =
    std::sync::OnceLock::new();

/// The client options of this invocation: PATCHPORT_TOKEN and friends from the
/// environment, and `--ca-cert`.
pub(crate) fn client_options() -> anyhow::Result<patchport_client::ClientOptions> {
    use anyhow::Context as _;
    let mut options = patchport_client::ClientOptions::from_env()?;
    if let Some(Some(path)) = CA_CERT.get() {
        options.ca_cert_pem = Some(
            std::fs::read(path)
                .with_context(|| format!("reading the CA certificate {}", path.display()))?,
        );
    }
    Ok(options)
}

/// Connects to the registry named by `--registry` / `PATCHPORT_REGISTRY`.
pub(crate) async fn connect(url: &str) -> anyhow::Result<patchport_client::Client> {
    Ok(patchport_client::Client::connect_with(url, client_options()?).await?)
}
