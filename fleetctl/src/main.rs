//! `fleetctl`: drive a Fleetplane control plane from a terminal.
//!
//! Every command is one or a few calls of the public admin API
//! (docs/admin-api.yaml); nothing here knows more than an operator with curl
//! would. Errors print one line, `error: <the server's message>`, and exit
//! with status 1 (2 for a command line clap cannot parse).

mod client;
mod contexts;
mod events;
mod output;
mod watch;

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use client::{Client, Target};
use output::{Format, Table, cell};

/// Drive a Fleetplane control plane: agents, configs, assignments, rollouts,
/// events, keys.
///
/// The server, token and tenant come from flags, else from FLEETCTL_SERVER /
/// FLEETCTL_TOKEN / FLEETCTL_TENANT, else from the current context of the
/// contexts file (`fleetctl context --help`), else http://127.0.0.1:4321.
#[derive(Debug, Parser)]
#[command(name = "fleetctl", version, about, long_about)]
struct Cli {
    /// Admin API base URL, e.g. http://127.0.0.1:4321.
    #[arg(long, global = true, env = "FLEETCTL_SERVER")]
    server: Option<String>,
    /// Operator token (Authorization: Bearer).
    #[arg(long, global = true, env = "FLEETCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Tenant to act on (Fleetplane-Tenant header).
    #[arg(long, global = true, env = "FLEETCTL_TENANT")]
    tenant: Option<String>,
    /// Context from the contexts file to use instead of the current one.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List agents, configs, assignments, rollouts, keys or connection settings.
    Get(Get),
    /// Show one agent, config or rollout in full.
    Describe {
        #[command(subcommand)]
        what: Describe,
    },
    /// Create a config version from files (a file, or every file of a
    /// directory); prints the diff against the latest version first.
    Apply(Apply),
    /// Show what `apply` would change, without changing anything.
    Diff(Apply),
    /// Assign a config to the agents a selector matches.
    Assign {
        /// Assignment name.
        name: String,
        /// Config name.
        #[arg(long)]
        config: String,
        /// Label selector (`key=value,key!=value,key,!key`); empty: every agent.
        #[arg(short = 'l', long, default_value = "")]
        selector: String,
        /// Pin a version; absent follows the latest.
        #[arg(long)]
        version: Option<u32>,
        /// Higher wins where several assignments match.
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Make it a layer: the config's one file goes under this
        /// config-map key (`00-base`, `namespace/name`).
        #[arg(long)]
        key: Option<String>,
    },
    /// Start, watch and command staged rollouts.
    Rollout {
        #[command(subcommand)]
        action: RolloutCommand,
    },
    /// Restart an agent, or every agent a selector matches (only agents that
    /// advertise AcceptsRestartCommand).
    Restart {
        /// Agent uid.
        uid: Option<String>,
        /// Restart every agent this selector matches (`*`: all).
        #[arg(short = 'l', long, conflicts_with = "uid")]
        selector: Option<String>,
    },
    /// Follow the tenant's event stream (agents, config statuses, rollouts, audit).
    Events {
        /// Resume after this event id (`0`: from the oldest kept).
        #[arg(long)]
        since: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Agent API keys.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Manage the contexts file (several control planes).
    Context {
        #[command(subcommand)]
        action: ContextCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
}

#[derive(Debug, Args)]
struct Get {
    #[arg(value_enum)]
    what: Kind,
    /// Label selector (agents only).
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// Only connected (true) or disconnected (false) agents.
    #[arg(long)]
    connected: Option<bool>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Kind {
    Agents,
    Configs,
    Assignments,
    Rollouts,
    Keys,
    ConnectionSettings,
    Packages,
}

#[derive(Debug, Subcommand)]
enum Describe {
    /// One agent: description, capabilities, health, configs, components.
    Agent { uid: String },
    /// Every version of a config.
    Config { name: String },
    /// One rollout: stages, failures and why, events.
    Rollout { id: String },
}

#[derive(Debug, Args)]
struct Apply {
    /// Config name.
    name: String,
    /// A file, or a directory whose files (not recursive) form the config.
    #[arg(short = 'f', long = "file", required = true)]
    path: PathBuf,
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Start a rollout of a config to an assignment's agents.
    Start {
        #[arg(long)]
        assignment: String,
        #[arg(long)]
        config: String,
        #[arg(long)]
        version: Option<u32>,
        /// Cumulative percentages per stage, e.g. 10,50,100.
        #[arg(long, value_delimiter = ',')]
        stages: Vec<u32>,
        /// Seconds each stage bakes before the next.
        #[arg(long)]
        bake: Option<f64>,
        /// Agents to change first (uids), repeatable.
        #[arg(long = "canary")]
        canaries: Vec<String>,
        /// Follow it until it ends, as `rollout watch` does.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a rollout stage by stage until it ends; exit 0 only if it completed.
    Watch {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    Abort {
        id: String,
    },
    /// Roll back: every changed agent is sent its previous config.
    Rollback {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// List keys (never their secrets).
    List,
    /// Create a key; the key itself is printed once.
    Create { name: String },
    /// Revoke a key by id; its agents are disconnected.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum ContextCommand {
    /// Create or replace a context from --server, --token and --tenant.
    Set { name: String },
    /// Make a context the current one.
    Use { name: String },
    /// List contexts (the current one starred).
    List,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            // One line, as every other error: clap's first, without usage.
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("bad command line");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("error: {first} (see fleetctl --help)");
            return ExitCode::from(2);
        }
    };
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // One line: the cause chain joined.
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn target(cli: &Cli) -> anyhow::Result<Target> {
    let file = contexts::Contexts::load()?;
    let context = file.pick(cli.context.as_deref())?.cloned().unwrap_or_default();
    let server = cli
        .server
        .clone()
        .or((!context.server.is_empty()).then_some(context.server))
        .unwrap_or_else(|| "http://127.0.0.1:4321".into());
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        bail!("server {server:?} is not an http:// or https:// URL");
    }
    Ok(Target {
        server,
        token: cli.token.clone().or(context.token),
        tenant: cli.tenant.clone().or(context.tenant),
    })
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let format = cli.output;
    match &cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "fleetctl", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Context { action } => {
            context(action, &cli)?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let client = Client::new(target(&cli)?)?;
    match cli.command {
        Command::Get(get) => list(&client, format, &get).await?,
        Command::Describe { what } => {
            let value = match &what {
                Describe::Agent { uid } => client.get(&format!("/api/v1/agents/{}", seg(uid))).await?,
                Describe::Config { name } => client.get(&format!("/api/v1/configs/{}", seg(name))).await?,
                Describe::Rollout { id } => client.get(&format!("/api/v1/rollouts/{}", seg(id))).await?,
            };
            // A description is nested: YAML reads best for people.
            let format = if format == Format::Table { Format::Yaml } else { format };
            output::print(format, &value, |_| Table::default());
        }
        Command::Diff(apply) => {
            let files = read_files(&apply.path)?;
            let diff = client
                .call(
                    Method::POST,
                    &format!("/api/v1/configs/{}/diff", seg(&apply.name)),
                    Some(&json!({ "files": files })),
                )
                .await?;
            print_diff(&diff);
        }
        Command::Apply(apply) => {
            let files = read_files(&apply.path)?;
            let body = json!({ "files": files });
            let path = format!("/api/v1/configs/{}", seg(&apply.name));
            let diff = client.call(Method::POST, &format!("{path}/diff"), Some(&body)).await?;
            print_diff(&diff);
            let created = client
                .call(Method::POST, &format!("{path}/versions"), Some(&body))
                .await?;
            let verb = if created["created"] == true {
                "created"
            } else {
                "unchanged:"
            };
            println!(
                "config {} {verb} version {} ({})",
                apply.name,
                cell(&created["version"]),
                cell(&created["hash"])
            );
        }
        Command::Assign {
            name,
            config,
            selector,
            version,
            priority,
            key,
        } => {
            let mut body = json!({ "config": config, "selector": selector, "priority": priority });
            if let Some(version) = version {
                body["version"] = json!(version);
            }
            if let Some(key) = key {
                body["key"] = json!(key);
            }
            let done = client
                .call(Method::PUT, &format!("/api/v1/assignments/{}", seg(&name)), Some(&body))
                .await?;
            output::print(format, &done, |v| {
                let mut t = Table::new(&["ASSIGNMENT", "SELECTOR", "CONFIG", "VERSION", "PRIORITY", "KEY"]);
                t.row(vec![
                    cell(&v["name"]),
                    cell(&v["selector"]),
                    cell(&v["config"]),
                    v["version"].as_u64().map_or("latest".into(), |n| n.to_string()),
                    cell(&v["priority"]),
                    cell(&v["key"]),
                ]);
                t
            });
        }
        Command::Rollout { action } => return rollout(&client, format, action).await,
        Command::Restart { uid, selector } => {
            let answer = match (uid, selector) {
                (Some(uid), None) => {
                    client
                        .call(Method::POST, &format!("/api/v1/agents/{}/restart", seg(&uid)), None)
                        .await?
                }
                (None, Some(selector)) => {
                    client
                        .call(
                            Method::POST,
                            "/api/v1/commands/restart",
                            Some(&json!({ "selector": selector })),
                        )
                        .await?
                }
                _ => bail!("give an agent uid or --selector"),
            };
            output::print(format, &answer, |v| {
                let mut t = Table::new(&["AGENT", "RESULT"]);
                if v["instance_uid"].is_string() {
                    t.row(vec![cell(&v["instance_uid"]), cell(&v["delivery"])]);
                }
                for a in v["requested"].as_array().into_iter().flatten() {
                    t.row(vec![cell(&a["instance_uid"]), cell(&a["delivery"])]);
                }
                for a in v["refused"].as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&a["instance_uid"]),
                        format!("refused: {}", cell(&a["reason"])),
                    ]);
                }
                t
            });
        }
        Command::Events { since, count } => events::follow(&client, format, since.as_deref(), count).await?,
        Command::Keys { action } => match action {
            KeysCommand::List => {
                let keys = client.get("/api/v1/keys").await?;
                output::print(format, &keys, |v| {
                    let mut t = Table::new(&["ID", "NAME", "REVOKED"]);
                    for k in v.as_array().into_iter().flatten() {
                        let revoked = k["revoked_unix_ms"].as_u64().is_some_and(|ms| ms > 0);
                        t.row(vec![cell(&k["id"]), cell(&k["name"]), revoked.to_string()]);
                    }
                    t
                });
            }
            KeysCommand::Create { name } => {
                let key = client
                    .call(Method::POST, "/api/v1/keys", Some(&json!({ "name": name })))
                    .await?;
                output::print(format, &key, |v| {
                    let mut t = Table::new(&["ID", "NAME", "KEY (shown once)"]);
                    t.row(vec![cell(&v["id"]), cell(&v["name"]), cell(&v["key"])]);
                    t
                });
            }
            KeysCommand::Revoke { id } => {
                client
                    .call(Method::DELETE, &format!("/api/v1/keys/{}", seg(&id)), None)
                    .await?;
                println!("key {id} revoked");
            }
        },
        Command::Completion { .. } | Command::Context { .. } => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A path segment, percent-encoded.
fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The files of a config: one file, or every regular file of a directory.
fn read_files(path: &PathBuf) -> anyhow::Result<BTreeMap<String, Value>> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let paths: Vec<PathBuf> = if meta.is_dir() {
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        found
    } else {
        vec![path.clone()]
    };
    if paths.is_empty() {
        bail!("{} holds no files", path.display());
    }
    let mut files = BTreeMap::new();
    for file in paths {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no UTF-8 name", file.display()))?
            .to_owned();
        let body = std::fs::read_to_string(&file).with_context(|| format!("{} (configs are text)", file.display()))?;
        let content_type = match file.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => "text/yaml",
            Some("json") => "application/json",
            Some("toml") => "application/toml",
            _ => "text/plain",
        };
        files.insert(name, json!({ "body": body, "content_type": content_type }));
    }
    Ok(files)
}

fn print_diff(diff: &Value) {
    let against = diff["against_version"]
        .as_u64()
        .map_or("nothing (a new config)".to_owned(), |v| format!("version {v}"));
    if diff["changed"] == false {
        println!("no change against {against}");
        return;
    }
    println!("changes against {against}:");
    print!("{}", diff["diff"].as_str().unwrap_or_default());
}

async fn list(client: &Client, format: Format, get: &Get) -> anyhow::Result<()> {
    let path = match get.what {
        Kind::Agents => {
            let mut query = Vec::new();
            if let Some(selector) = &get.selector {
                query.push(format!("selector={}", seg(selector)));
            }
            if let Some(connected) = get.connected {
                query.push(format!("connected={connected}"));
            }
            format!("/api/v1/agents?{}", query.join("&"))
        }
        Kind::Configs => "/api/v1/configs".into(),
        Kind::Assignments => "/api/v1/assignments".into(),
        Kind::Rollouts => "/api/v1/rollouts".into(),
        Kind::Keys => "/api/v1/keys".into(),
        Kind::ConnectionSettings => "/api/v1/connection-settings".into(),
        Kind::Packages => "/api/v1/packages".into(),
    };
    if get.selector.is_some() && !matches!(get.what, Kind::Agents) {
        bail!("--selector applies to agents only");
    }
    let value = client.get(&path).await?;
    let what = get.what;
    output::print(format, &value, |v| {
        let rows = v.as_array().cloned().unwrap_or_default();
        match what {
            Kind::Agents => {
                let mut t = Table::new(&["UID", "SERVICE", "CONNECTED", "HEALTHY", "CONFIG", "STATUS", "DESIRED"]);
                for a in &rows {
                    t.row(vec![
                        cell(&a["instance_uid"]),
                        cell(&a["identifying_attributes"]["service.name"]),
                        cell(&a["connected"]),
                        cell(&a["healthy"]),
                        short(&a["remote_config"]["hash"]),
                        cell(&a["remote_config"]["status"]),
                        match (&a["desired_config"]["config"], &a["desired_config"]["version"]) {
                            (Value::String(c), v) => format!("{c} v{}", cell(v)),
                            _ => "-".into(),
                        },
                    ]);
                }
                t
            }
            Kind::Configs => {
                let mut t = Table::new(&["CONFIG", "LATEST", "HASH", "FILES"]);
                for c in &rows {
                    t.row(vec![
                        cell(&c["name"]),
                        cell(&c["version"]),
                        short(&c["hash"]),
                        cell(&c["files"]),
                    ]);
                }
                t
            }
            Kind::Assignments => {
                let mut t = Table::new(&["ASSIGNMENT", "SELECTOR", "CONFIG", "VERSION", "PRIORITY", "KEY"]);
                for a in &rows {
                    t.row(vec![
                        cell(&a["name"]),
                        cell(&a["selector"]),
                        cell(&a["config"]),
                        a["version"].as_u64().map_or("latest".into(), |n| n.to_string()),
                        cell(&a["priority"]),
                        cell(&a["key"]),
                    ]);
                }
                t
            }
            Kind::Rollouts => {
                let mut t = Table::new(&["ROLLOUT", "ASSIGNMENT", "CONFIG", "STATE", "STAGE", "REASON"]);
                for r in &rows {
                    t.row(vec![
                        cell(&r["id"]),
                        cell(&r["assignment"]),
                        format!("{} v{}", cell(&r["config"]), cell(&r["version"])),
                        cell(&r["state"]),
                        cell(&r["stage"]),
                        cell(&r["reason"]),
                    ]);
                }
                t
            }
            Kind::Keys => {
                let mut t = Table::new(&["ID", "NAME", "REVOKED"]);
                for k in &rows {
                    let revoked = k["revoked_unix_ms"].as_u64().is_some_and(|ms| ms > 0);
                    t.row(vec![cell(&k["id"]), cell(&k["name"]), revoked.to_string()]);
                }
                t
            }
            Kind::Packages => {
                let mut t = Table::new(&["SET", "SELECTOR", "PACKAGES"]);
                for s in &rows {
                    let packages = s["packages"]
                        .as_object()
                        .map(|p| {
                            p.iter()
                                .map(|(name, p)| {
                                    format!(
                                        "{}@{}",
                                        if name.is_empty() { "\"\"" } else { name },
                                        cell(&p["version"])
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .unwrap_or_default();
                    t.row(vec![cell(&s["name"]), cell(&s["selector"]), packages]);
                }
                t
            }
            Kind::ConnectionSettings => {
                let mut t = Table::new(&["NAME", "SELECTOR", "OWN METRICS", "OWN TRACES", "OWN LOGS", "OPAMP"]);
                for s in &rows {
                    t.row(vec![
                        cell(&s["name"]),
                        cell(&s["selector"]),
                        cell(&s["own_metrics"]["endpoint"]),
                        cell(&s["own_traces"]["endpoint"]),
                        cell(&s["own_logs"]["endpoint"]),
                        if s["opamp"].is_object() {
                            "yes".into()
                        } else {
                            "-".into()
                        },
                    ]);
                }
                t
            }
        }
    });
    Ok(())
}

/// The first 12 hex digits of a hash.
fn short(hash: &Value) -> String {
    match hash.as_str() {
        Some(h) if h.len() > 12 => h[..12].to_owned(),
        _ => cell(hash),
    }
}

async fn rollout(client: &Client, format: Format, action: RolloutCommand) -> anyhow::Result<ExitCode> {
    let act = |id: String, verb: &'static str| async move {
        let r = client
            .call(Method::POST, &format!("/api/v1/rollouts/{}/{verb}", seg(&id)), None)
            .await?;
        println!("rollout {id}: {}", cell(&r["state"]));
        anyhow::Ok(())
    };
    match action {
        RolloutCommand::Start {
            assignment,
            config,
            version,
            stages,
            bake,
            canaries,
            watch,
        } => {
            let mut body = json!({ "assignment": assignment, "config": config, "canaries": canaries });
            if let Some(version) = version {
                body["version"] = json!(version);
            }
            if !stages.is_empty() {
                body["stages"] = json!(stages);
            }
            if let Some(bake) = bake {
                body["bake_seconds"] = json!(bake);
            }
            let created = client.call(Method::POST, "/api/v1/rollouts", Some(&body)).await?;
            let id = cell(&created["id"]);
            if format == Format::Table {
                println!("rollout {id} started");
            } else {
                output::print(format, &created, |_| Table::default());
            }
            if watch {
                return watch::follow(client, &id).await;
            }
        }
        RolloutCommand::Watch { id } => return watch::follow(client, &id).await,
        RolloutCommand::Pause { id } => act(id, "pause").await?,
        RolloutCommand::Resume { id } => act(id, "resume").await?,
        RolloutCommand::Abort { id } => act(id, "abort").await?,
        RolloutCommand::Rollback { id } => act(id, "rollback").await?,
    }
    Ok(ExitCode::SUCCESS)
}

fn context(action: &ContextCommand, cli: &Cli) -> anyhow::Result<()> {
    let mut file = contexts::Contexts::load()?;
    match action {
        ContextCommand::Set { name } => {
            let server_url = cli.server.as_deref().context("--server is required")?;
            if !(server_url.starts_with("http://") || server_url.starts_with("https://")) {
                bail!("server {server_url:?} is not an http:// or https:// URL");
            }
            file.contexts.insert(
                name.clone(),
                contexts::Context {
                    server: server_url.to_owned(),
                    token: cli.token.clone(),
                    tenant: cli.tenant.clone(),
                },
            );
            if file.current.is_none() {
                file.current = Some(name.clone());
            }
            file.save()?;
            println!("context {name} saved in {}", contexts::path()?.display());
        }
        ContextCommand::Use { name } => {
            if !file.contexts.contains_key(name) {
                bail!("no context {name:?} (see `fleetctl context list`)");
            }
            file.current = Some(name.clone());
            file.save()?;
            println!("now using context {name}");
        }
        ContextCommand::List => {
            let mut t = Table::new(&["CURRENT", "NAME", "SERVER", "TENANT"]);
            for (name, c) in &file.contexts {
                let current = if file.current.as_deref() == Some(name) { "*" } else { "" };
                t.row(vec![
                    current.into(),
                    name.clone(),
                    c.server.clone(),
                    c.tenant.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(())
}
