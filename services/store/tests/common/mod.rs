//! Helpers shared by the metadata store suites (each test file uses a subset).
#![allow(dead_code, unreachable_pub)]

use patchport_core::layout::FileRef;
use patchport_core::{Digest, Name, Version, VersionRef};
use patchport_store::meta::{NewBaseVersion, NewPatchVersion};

pub fn name(s: &str) -> Name {
    s.parse().unwrap()
}

pub fn ver(s: &str) -> Version {
    s.parse().unwrap()
}

pub fn vref(s: &str) -> VersionRef {
    s.parse().unwrap()
}

pub fn file(path: &str, content: &str) -> FileRef {
    FileRef {
        path: path.to_owned(),
        digest: Digest::of(content.as_bytes()),
        size: content.len() as u64,
    }
}

pub fn new_base(n: &str, v: &str, parent: Option<&str>, content: &str) -> NewBaseVersion {
    let files = vec![
        file("config.json", "{}"),
        file("model.safetensors", content),
    ];
    NewBaseVersion {
        name: name(n),
        version: ver(v),
        digest: patchport_core::layout::manifest_digest("base", &files),
        parent: parent.map(vref),
        files,
        config_json: r#"{"model_type":"llama"}"#.to_owned(),
        model_type: "llama".to_owned(),
        tensor_count: 3,
    }
}

pub fn new_patch(
    n: &str,
    v: &str,
    base: &str,
    base_version: &str,
    content: &str,
) -> NewPatchVersion {
    let files = vec![
        file("adapter_config.json", "{}"),
        file("adapter_model.safetensors", content),
    ];
    NewPatchVersion {
        name: name(n),
        version: ver(v),
        digest: patchport_core::layout::manifest_digest("patch", &files),
        base_name: name(base),
        base: vref(base_version),
        files,
        adapter_json: r#"{"peft_type":"LORA"}"#.to_owned(),
        peft_type: "LORA".to_owned(),
        tensor_count: 4,
        eval_digest: None,
    }
}

/// A fresh database on the Postgres server of `url`; returns its URL.
pub async fn fresh_pg_url(url: &str) -> String {
    use sqlx::Connection;
    let db = format!("pp_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(url);
    format!("{base}/{db}")
}
