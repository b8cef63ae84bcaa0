//! `shardmq-bench`: an MQTT load generator with emqtt-bench's commands and
//! flags (`conn`, `pub`, `sub`) plus `bench`, publishers and subscribers in
//! one process measuring throughput, end-to-end latency and loss.
//!
//! Every run is bounded by `--duration` (default 60 s) and by message counts;
//! it only connects to the host it is given. See `--help` and
//! `loadtest/README.md`.

mod args;
mod bench;
mod emq;
mod engine;
mod mqtt;
mod stats;

use std::net::ToSocketAddrs;
use std::process::ExitCode;

use args::Command;
use mqtt::ConnectOpts;

fn main() -> ExitCode {
    stats::start_instant();
    let args = match args::parse(std::env::args().collect()) {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardmq-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let nofile = stats::raise_nofile();
    let needed = match args.command {
        Command::Bench => args.pubs + args.subs,
        _ => args.count,
    } as u64;
    if nofile > 0 && needed + 64 > nofile {
        eprintln!(
            "shardmq-bench: warning: {needed} connections but the open-file limit is {nofile}"
        );
    }
    // Resolve once, prefer IPv4 (brokers here listen on 127.0.0.1).
    let addr = match (args.host.as_str(), args.port).to_socket_addrs() {
        Ok(addrs) => {
            let all: Vec<_> = addrs.collect();
            match all.iter().find(|a| a.is_ipv4()).or(all.first()) {
                Some(a) => *a,
                None => {
                    eprintln!("shardmq-bench: {}: no address", args.host);
                    return ExitCode::from(2);
                }
            }
        }
        Err(e) => {
            eprintln!("shardmq-bench: {}: {e}", args.host);
            return ExitCode::from(2);
        }
    };
    let tls = match args.ssl {
        false => None,
        true => {
            let config = match shardmq_bench_tls(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("shardmq-bench: {e}");
                    return ExitCode::from(2);
                }
            };
            Some(config)
        }
    };
    let opts = ConnectOpts {
        addr,
        version: args.version,
        keepalive: args.keepalive,
        clean: args.clean,
        session_expiry: args.session_expiry,
        username: args.username.clone(),
        password: args.password.clone(),
        timeout: args.connect_timeout,
        tls,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shardmq-bench: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async move {
        match args.command {
            Command::Bench => bench::run(args, opts).await,
            _ => emq::run(args, opts).await,
        }
    });
    // Tasks that did not stop in time are not waited for.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("shardmq-bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// The TLS client configuration and the server name for `--ssl`.
fn shardmq_bench_tls(
    args: &args::Args,
) -> Result<
    (
        std::sync::Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    ),
    String,
> {
    let config = mqtt::tls_config(args.cacertfile.as_deref())?;
    let name = rustls::pki_types::ServerName::try_from(args.host.clone())
        .map_err(|e| format!("{}: not a TLS server name: {e}", args.host))?;
    if args.cacertfile.is_none() && !args.quiet {
        eprintln!(
            "shardmq-bench: --ssl without --cacertfile: the broker's certificate is not checked"
        );
    }
    Ok((config, name))
}
