//! A moto_server of a test's own that checks credentials, unlike the
//! shared one (`REMUS_TEST_S3_ENDPOINT`), which takes any key.
//!
//! moto checks nothing for its first `INITIAL_NO_AUTH_ACTION_COUNT`
//! actions, counted server-wide over every service, and from then on
//! verifies each request's signature against the access keys of IAM
//! users made within it, and their policies: root and made-up keys are
//! refused. Hence a server per test, and exactly as many free actions as
//! [`AuthMoto::user_with_s3_access`] spends.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::run_limited;

/// The IAM actions that make a user with a key (create the user, give it
/// a policy, create its key): moto serves this many per user unchecked.
const ACTIONS_PER_USER: u32 = 3;

/// Makes an IAM user with a policy and prints its new key as JSON (argv:
/// endpoint, user name, policy statements as JSON); boto3 comes with moto.
const MAKE_USER: &str = r#"
import json, sys
import boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName=sys.argv[2])
policy = {"Version": "2012-10-17", "Statement": json.loads(sys.argv[3])}
iam.put_user_policy(UserName=sys.argv[2], PolicyName="remus-test", PolicyDocument=json.dumps(policy))
key = iam.create_access_key(UserName=sys.argv[2])["AccessKey"]
print(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
"#;

/// A running moto_server that checks credentials; killed when dropped.
pub struct AuthMoto {
    child: Child,
    /// Its URL, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    binary: PathBuf,
    log: PathBuf,
}

impl AuthMoto {
    /// Starts one on a free loopback port, logging into `dir`, and waits
    /// until it answers; one user may be made.
    pub fn start(dir: &Path) -> Self {
        Self::start_for(dir, 1)
    }

    /// As [`start`](Self::start), for `users` users to be made.
    pub fn start_for(dir: &Path, users: u32) -> Self {
        let binary = PathBuf::from(std::env::var("REMUS_TEST_MOTO_SERVER").unwrap_or_else(|_| {
            panic!("REMUS_TEST_MOTO_SERVER is not set: run `bash scripts/test.sh`, or `source scripts/s3-server.sh`, which export it")
        }));
        assert!(binary.is_file(), "REMUS_TEST_MOTO_SERVER: no moto_server at {}", binary.display());
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = dir.join("moto-auth.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", (users * ACTIONS_PER_USER).to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut moto = Self { child, endpoint: format!("http://127.0.0.1:{port}"), binary, log };
        moto.wait_ready(port, Duration::from_secs(60));
        moto
    }

    /// Polls moto's own API (not an S3 or IAM action, so not counted).
    fn wait_ready(&mut self, port: u16, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = [0u8; 12];
                if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_ok()
                    && s.read_exact(&mut head).is_ok()
                    && head.starts_with(b"HTTP/1.")
                {
                    return;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("moto_server exited with {status}: {}", self.log_text());
            }
            assert!(Instant::now() < deadline, "moto_server did not answer within {limit:?}: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Makes IAM user `name` allowed `s3:*` with a new access key;
    /// returns (access key id, secret). Users are made first: they spend
    /// the actions moto serves unchecked.
    pub fn user_with_s3_access(&self, name: &str) -> (String, String) {
        self.user_with_policy(name, &serde_json::json!([{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]))
    }

    /// Makes IAM user `name` with the policy `statements` and a new access
    /// key; returns (access key id, secret).
    pub fn user_with_policy(&self, name: &str, statements: &serde_json::Value) -> (String, String) {
        let python = self.binary.with_file_name("python");
        assert!(python.is_file(), "no python beside {} (moto's virtualenv)", self.binary.display());
        let out = run_limited(
            Command::new(&python).args(["-c", MAKE_USER, &self.endpoint, name, &statements.to_string()]),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "making IAM user {name}: {}\n{}", String::from_utf8_lossy(&out.stderr), self.log_text());
        let key: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the key as JSON");
        (key["id"].as_str().unwrap().to_string(), key["secret"].as_str().unwrap().to_string())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AuthMoto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
