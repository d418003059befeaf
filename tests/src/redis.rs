//! A real `redis-server` for the cluster tests, on a free loopback port, with nothing saved to
//! disk: started, stopped and restarted on the same port (a Redis restart empties it), and
//! killed when dropped.
//!
//! `CLOUDLLM_SKIP_CLUSTER_TEST=1` lets machines without `redis-server` skip the cluster tests
//! ([`RedisServer::available`]).

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The binary: Debian's `redis-server` (7.0) or Valkey's, which takes the same flags.
const REDIS_SERVER: &str = "redis-server";

/// How long a fresh server gets to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `redis-server`.
pub struct RedisServer {
    /// Its address.
    pub addr: SocketAddr,
    /// The password it requires (`--requirepass`), if any.
    pub password: Option<String>,
    /// More `redis-server` arguments (TLS files and port).
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Whether the cluster tests should run: `redis-server` is installed, and
    /// `CLOUDLLM_SKIP_CLUSTER_TEST` is not set. Says why when not.
    pub fn available() -> bool {
        if std::env::var_os("CLOUDLLM_SKIP_CLUSTER_TEST").is_some_and(|v| v == "1") {
            eprintln!("CLOUDLLM_SKIP_CLUSTER_TEST=1: skipping a cluster test");
            return false;
        }
        let found = Command::new(REDIS_SERVER)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "the cluster tests need `redis-server` (apt install redis-server); \
             set CLOUDLLM_SKIP_CLUSTER_TEST=1 to skip them"
        );
        found
    }

    /// Starts a server on a free loopback port.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(None).await
    }

    /// Starts a server on a free loopback port that requires `password`.
    pub async fn start_with_password(password: &str) -> RedisServer {
        RedisServer::start_with(Some(password.to_owned())).await
    }

    /// Starts a server that also speaks TLS on the port it returns, with `cert` and `key` (PEM
    /// files), not asking clients for certificates. The plain port stays for the readiness check.
    pub async fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> (RedisServer, u16) {
        let tls_port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let extra = [
            "--tls-port".to_owned(),
            tls_port.to_string(),
            "--tls-cert-file".to_owned(),
            cert.display().to_string(),
            "--tls-key-file".to_owned(),
            key.display().to_string(),
            "--tls-ca-cert-file".to_owned(),
            ca.display().to_string(),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        (
            RedisServer::start_with_args(None, extra.to_vec()).await,
            tls_port,
        )
    }

    async fn start_with(password: Option<String>) -> RedisServer {
        RedisServer::start_with_args(password, Vec::new()).await
    }

    async fn start_with_args(password: Option<String>, extra: Vec<String>) -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = RedisServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            password,
            extra,
            child: None,
        };
        server.launch().await;
        server
    }

    /// Its URL with the given scheme (`redis`, `valkey`).
    pub fn url(&self, scheme: &str) -> String {
        match &self.password {
            Some(password) => format!("{scheme}://:{password}@{}", self.addr),
            None => format!("{scheme}://{}", self.addr),
        }
    }

    async fn launch(&mut self) {
        let mut command = Command::new(REDIS_SERVER);
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .args(&self.extra)
            .args(["--port", &self.addr.port().to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while self.ping().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not answer on {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// PING, over a fresh connection.
    pub async fn ping(&self) -> std::io::Result<()> {
        let reply = self.command(&["PING"]).await?;
        // A server that requires a password answers NOAUTH: it is up.
        if reply.starts_with("+PONG") || reply.starts_with("-NOAUTH") {
            Ok(())
        } else {
            Err(std::io::Error::other(reply))
        }
    }

    /// Sends one command (inline RESP) and returns the raw first reply chunk.
    pub async fn command(&self, args: &[&str]) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(self.addr),
        )
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).await?;
        let mut buf = vec![0; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Kills the server (its data goes with it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts an empty one on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
