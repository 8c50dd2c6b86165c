//! `ocmesh status`: a running site's status, read from its REST API.

use anyhow::{Context, bail};
use serde_json::Value;

/// Settings of `ocmesh status`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// The site's REST API.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    pub api: String,
    /// User to sign in as (peers and store figures need a signed-in user).
    #[arg(long, default_value = "admin")]
    pub user: String,
    /// That user's password; without one only the site's health is shown.
    #[arg(long, env = "OCMESH_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let api = args.api.trim_end_matches('/');
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let health = get(&client, api, "/health", None).await?;
    let site = health["site"].as_str().unwrap_or("?");
    println!("site {site}: {} ({api})", health["status"].as_str().unwrap_or("?"));
    let Some(password) = &args.password else {
        println!("(pass --password or set OCMESH_PASSWORD to see peers and store figures)");
        return Ok(());
    };
    let auth = Some((args.user.as_str(), password.as_str()));
    let m = get(&client, api, "/api/v1/metrics", auth).await?;
    let n = |k: &str| m[k].as_u64().unwrap_or(0);
    println!(
        "store: {} changes held, {} writes in {} commits, {} log syncs, {} durable checkpoints",
        n("changes_held"),
        n("writes"),
        n("commits"),
        n("wal_syncs"),
        n("checkpoints")
    );
    println!(
        "writer queue: {} of {}; changes from peers: {} applied, {} refused, {} withheld",
        n("writer_queue_now"),
        n("writer_queue_bound"),
        n("remote_applied"),
        n("remote_refused"),
        n("remote_withheld")
    );
    let peers = m["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        println!("peers: none");
    }
    for p in peers {
        let pn = |k: &str| p[k].as_u64().unwrap_or(0);
        println!(
            "peer {} ({} {}): {}, {} unacknowledged, {} sent, {} received",
            p["site"].as_str().unwrap_or("not yet seen"),
            p["direction"].as_str().unwrap_or("?"),
            p["address"].as_str().unwrap_or("?"),
            if p["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "not connected"
            },
            pn("unacked"),
            pn("changes_sent"),
            pn("changes_received")
        );
    }
    Ok(())
}

/// GETs `path` as JSON; names the API and what went wrong otherwise.
async fn get(client: &reqwest::Client, api: &str, path: &str, auth: Option<(&str, &str)>) -> anyhow::Result<Value> {
    let url = format!("{api}{path}");
    let mut request = client.get(&url);
    if let Some((user, password)) = auth {
        request = request.basic_auth(user, Some(password));
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the site's API at {api}"))?;
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        bail!(
            "{url} refused the sign-in of user {:?}: check --user and --password",
            auth.map_or("", |a| a.0)
        );
    }
    if !status.is_success() {
        bail!("{url} answered {status}: {}", response.text().await.unwrap_or_default());
    }
    response
        .json()
        .await
        .with_context(|| format!("{url} did not answer with JSON"))
}
