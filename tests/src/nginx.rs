//! A real nginx in front of relays, configured with exactly the snippet the README points
//! operators to (`packaging/nginx/cloudllm-relay.conf`) and the `upstream` block a test gives
//! (one relay, or the cluster example's `upstream.conf`): the reverse-proxy tests and the
//! cluster deployment test run the same nginx.
//!
//! Needs the `nginx` binary (Debian package `nginx`); `CLOUDLLM_SKIP_NGINX_TEST=1` lets
//! machines without it skip those tests ([`binary`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use url::Url;

use crate::{scratch_dir, wait_for};

/// How many free ports [`Nginx::start`] tries before giving up: another process taking the
/// port in the moment between the kernel handing it out and nginx binding it is rare.
const ATTEMPTS: usize = 5;

/// How often [`Nginx::start`] looks whether nginx listens yet.
const READY_EVERY: Duration = Duration::from_millis(20);

/// The snippet operators include, from the repository.
pub fn snippet() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/nginx/cloudllm-relay.conf")
        .canonicalize()
        .expect("packaging/nginx/cloudllm-relay.conf")
}

/// The nginx binary, or `None` when it is missing and the test may be skipped.
pub fn binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|path| path.is_file());
    if found.is_none() {
        if std::env::var("CLOUDLLM_SKIP_NGINX_TEST").as_deref() == Ok("1") {
            eprintln!("skipping: nginx not found and CLOUDLLM_SKIP_NGINX_TEST=1");
            return None;
        }
        panic!(
            "nginx not found: install it (Debian: nginx), or set CLOUDLLM_SKIP_NGINX_TEST=1 to skip"
        );
    }
    found
}

/// An nginx in the foreground, one process, with its files in a scratch directory; killed
/// when dropped.
pub struct Nginx {
    child: Child,
    /// Its address.
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Starts `binary` on a free loopback port with `upstream` (an nginx `upstream
    /// cloudllm_relay` block) and the snippet included in its `server` block.
    ///
    /// nginx cannot be given port 0, so the port is one the kernel just handed out and this
    /// test released; should another process take it in between, nginx fails to bind and the
    /// next port is tried.
    pub async fn start(binary: &Path, upstream: &str) -> Nginx {
        for _ in 0..ATTEMPTS {
            let dir = scratch_dir();
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port");
            let temp = |name: &str| dir.join(name).display().to_string();
            let conf = format!(
                "daemon off;\n\
                 master_process off;\n\
                 worker_processes 1;\n\
                 pid {pid};\n\
                 error_log {log} info;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n\
                 access_log off;\n\
                 client_body_temp_path {body};\n\
                 proxy_temp_path {proxy};\n\
                 fastcgi_temp_path {fastcgi};\n\
                 uwsgi_temp_path {uwsgi};\n\
                 scgi_temp_path {scgi};\n\
                 {upstream}\n\
                 server {{\n\
                 listen {addr};\n\
                 include {snippet};\n\
                 }}\n\
                 }}\n",
                pid = temp("nginx.pid"),
                log = temp("error.log"),
                body = temp("body"),
                proxy = temp("proxy"),
                fastcgi = temp("fastcgi"),
                uwsgi = temp("uwsgi"),
                scgi = temp("scgi"),
                snippet = snippet().display(),
            );
            let conf_path = dir.join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let child = Command::new(binary)
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting nginx");
            let mut nginx = Nginx { child, addr, dir };
            if nginx.wait_ready().await {
                return nginx;
            }
        }
        panic!("nginx did not start in {ATTEMPTS} attempts");
    }

    /// Waits until nginx accepts connections; `false` if it exited (its port was taken).
    async fn wait_ready(&mut self) -> bool {
        wait_for(READY_EVERY, async || {
            if let Some(status) = self.child.try_wait().expect("nginx's status") {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                assert!(
                    log.contains("Address already in use"),
                    "nginx exited ({status}):\n{log}"
                );
                return Ok(false);
            }
            match tokio::net::TcpStream::connect(self.addr).await {
                Ok(_) => Ok(true),
                Err(_) => Err("nginx did not start listening".to_owned()),
            }
        })
        .await
    }

    /// Its base URL.
    pub fn url(&self) -> Url {
        Url::parse(&format!("http://{}", self.addr)).expect("nginx URL")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
