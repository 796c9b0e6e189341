//! `patchport token`, `patchport namespace` and `patchport audit`: access control.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use patchport_proto::v1;
use serde_json::{Value, json};

use crate::output;

/// Token commands.
#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token; its secret is printed once and never stored.
    Create(TokenCreateArgs),
    /// List tokens (never their secrets).
    List(TokenListArgs),
    /// Revoke a token by id.
    Revoke(TokenRevokeArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TokenCreateArgs {
    /// The namespace it acts on, or `*` for every namespace.
    #[arg(long)]
    namespace: String,
    /// read, push, admin or worker.
    #[arg(long)]
    scope: String,
    /// Lifetime: `30d`, `12h`, `45m`, `90s`; default: never expires.
    #[arg(long)]
    expires: Option<String>,
    /// Free text shown by `token list`.
    #[arg(long, default_value = "")]
    description: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct TokenListArgs {
    /// Only this namespace (default: every token you may administer).
    #[arg(long, default_value = "")]
    namespace: String,
    /// Include revoked tokens.
    #[arg(long)]
    all: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct TokenRevokeArgs {
    /// The token id (the `<id>` of `pp_<id>_<secret>`).
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Namespace policy commands.
#[derive(Debug, Subcommand)]
pub(crate) enum NamespaceCommand {
    /// Show a namespace's policy.
    Show(NamespaceShowArgs),
    /// Change a namespace's policy.
    Set(NamespaceSetArgs),
}

#[derive(Debug, Args)]
pub(crate) struct NamespaceShowArgs {
    /// The namespace.
    namespace: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct NamespaceSetArgs {
    /// The namespace.
    namespace: String,
    /// Let anyone read (list, get, pull, compat, resolve, events) without a token.
    #[arg(long)]
    anonymous_read: Option<bool>,
    /// `resolve` returns only ports whose evaluation passed.
    #[arg(long)]
    require_pass: Option<bool>,
    /// `resolve` returns only signed artifacts (model signature and port provenance).
    #[arg(long)]
    require_signed: Option<bool>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// Only this namespace (default: all, which needs admin on `*`).
    #[arg(long, default_value = "")]
    namespace: String,
    /// At most this many entries, newest first.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Parses `30d`, `12h`, `45m`, `90s` or plain seconds.
fn parse_duration(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid duration {s:?}: expected e.g. 30d, 12h, 45m"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("invalid duration unit in {s:?}: use s, m, h or d"),
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .with_context(|| format!("invalid duration {s:?}"))
}

fn time_ms(t: Option<&prost_types::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| {
        json!(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
    })
}

fn token_json(t: &v1::Token) -> Value {
    json!({
        "id": t.id,
        "namespace": t.namespace,
        "scope": t.scope,
        "description": t.description,
        "created_by": t.created_by,
        "created_at_ms": time_ms(t.created_at.as_ref()),
        "expires_at_ms": time_ms(t.expires_at.as_ref()),
        "revoked_at_ms": time_ms(t.revoked_at.as_ref()),
    })
}

pub(crate) async fn token(registry: &str, cmd: TokenCommand) -> anyhow::Result<()> {
    let mut admin = super::connect(registry).await?.admin();
    match cmd {
        TokenCommand::Create(a) => {
            let expires_in_seconds = a.expires.as_deref().map(parse_duration).transpose()?;
            let out = admin
                .create_token(v1::CreateTokenRequest {
                    namespace: a.namespace,
                    scope: a.scope,
                    expires_in_seconds: expires_in_seconds.unwrap_or(0),
                    description: a.description,
                })
                .await?
                .into_inner();
            let t = out.token.context("the registry returned no token record")?;
            if a.json {
                let mut v = token_json(&t);
                v["secret"] = json!(out.secret);
                output::print_json(&v);
            } else {
                println!("{}", out.secret);
                eprintln!(
                    "token {} (scope {} on {}): shown once, store it now",
                    t.id, t.scope, t.namespace
                );
            }
        }
        TokenCommand::List(a) => {
            let tokens = admin
                .list_tokens(v1::ListTokensRequest {
                    namespace: a.namespace,
                    include_revoked: a.all,
                })
                .await?
                .into_inner()
                .tokens;
            if a.json {
                output::print_json(&Value::Array(tokens.iter().map(token_json).collect()));
            } else {
                for t in &tokens {
                    let state = if t.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    println!(
                        "{}  {:<7} {:<20} {:<8} {}",
                        t.id, t.scope, t.namespace, state, t.description
                    );
                }
            }
        }
        TokenCommand::Revoke(a) => {
            let t = admin
                .revoke_token(v1::RevokeTokenRequest { id: a.id })
                .await?
                .into_inner();
            if a.json {
                output::print_json(&token_json(&t));
            } else {
                println!("revoked token {}", t.id);
            }
        }
    }
    Ok(())
}

fn policy_json(p: &v1::NamespacePolicy) -> Value {
    json!({
        "namespace": p.namespace,
        "anonymous_read": p.anonymous_read,
        "require_pass": p.require_pass,
        "require_signed": p.require_signed,
    })
}

pub(crate) async fn namespace(registry: &str, cmd: NamespaceCommand) -> anyhow::Result<()> {
    let mut admin = super::connect(registry).await?.admin();
    let (policy, json_out) = match cmd {
        NamespaceCommand::Show(a) => (
            admin
                .get_namespace_policy(v1::GetNamespacePolicyRequest {
                    namespace: a.namespace,
                })
                .await?
                .into_inner(),
            a.json,
        ),
        NamespaceCommand::Set(a) => {
            let mut p = admin
                .get_namespace_policy(v1::GetNamespacePolicyRequest {
                    namespace: a.namespace.clone(),
                })
                .await?
                .into_inner();
            if let Some(v) = a.anonymous_read {
                p.anonymous_read = v;
            }
            if let Some(v) = a.require_pass {
                p.require_pass = v;
            }
            if let Some(v) = a.require_signed {
                p.require_signed = v;
            }
            (admin.set_namespace_policy(p).await?.into_inner(), a.json)
        }
    };
    if json_out {
        output::print_json(&policy_json(&policy));
    } else {
        println!(
            "{}: anonymous_read={} require_pass={} require_signed={}",
            policy.namespace, policy.anonymous_read, policy.require_pass, policy.require_signed
        );
    }
    Ok(())
}

pub(crate) async fn audit(registry: &str, a: AuditArgs) -> anyhow::Result<()> {
    let mut admin = super::connect(registry).await?.admin();
    let entries = admin
        .list_audit(v1::ListAuditRequest {
            namespace: a.namespace,
            limit: a.limit,
        })
        .await?
        .into_inner()
        .entries;
    if a.json {
        output::print_json(&Value::Array(
            entries
                .iter()
                .map(|e| {
                    json!({
                        "id": e.id,
                        "time_ms": time_ms(e.time.as_ref()),
                        "actor": e.actor,
                        "action": e.action,
                        "target": e.target,
                        "namespace": e.namespace,
                        "outcome": e.outcome,
                        "detail": e.detail,
                    })
                })
                .collect(),
        ));
    } else {
        for e in &entries {
            println!(
                "{:>6}  {:<18} {:<16} {:<20} {:<32} {}",
                e.id, e.actor, e.action, e.outcome, e.target, e.detail
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_duration("12h").unwrap(), 12 * 3600);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert!(parse_duration("0d").is_err());
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("").is_err());
    }
}
