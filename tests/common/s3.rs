//! An S3-compatible server for the tests: moto's, on 127.0.0.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// moto's server (`pip install --target DIR "moto[server]"`, as
/// scripts/install-deps.sh does), on a free port, with one bucket `bkt`;
/// stopped when dropped.
pub struct Server {
    child: Child,
    port: u16,
}

/// A machine that uses the server: its `LVPIPE_CACHE`.
pub struct S3 {
    pub port: u16,
    pub cache: PathBuf,
}

/// Credentials moto's IAM knows, in a server started with them.
pub struct Credentials {
    pub key: String,
    pub secret: String,
}

impl Server {
    pub fn start() -> Server {
        Self::spawn(None)
    }

    /// A server that checks every request's signature against the access
    /// keys its IAM holds (moto's `INITIAL_NO_AUTH_ACTION_COUNT`: the
    /// bucket, a user, its policy and its key are made unsigned first), and
    /// the key it made.
    pub fn start_with_credentials() -> (Server, Credentials) {
        let server = Self::spawn(Some(4));
        let iam = |form: &str| {
            let (status, body) =
                server
                    .client(Path::new("cache"))
                    .request_to("iam", "POST", "/", form.as_bytes());
            assert_eq!(status, 200, "{form}: {}", String::from_utf8_lossy(&body));
            String::from_utf8(body).unwrap()
        };
        iam("Action=CreateUser&UserName=u&Version=2010-05-08");
        iam(concat!(
            "Action=PutUserPolicy&UserName=u&PolicyName=all&Version=2010-05-08&PolicyDocument=",
            "%7B%22Version%22%3A%222012-10-17%22%2C%22Statement%22%3A%5B%7B%22Effect%22%3A",
            "%22Allow%22%2C%22Action%22%3A%22*%22%2C%22Resource%22%3A%22*%22%7D%5D%7D"
        ));
        let made = iam("Action=CreateAccessKey&UserName=u&Version=2010-05-08");
        let tag = |t: &str| {
            made.split(&format!("<{t}>"))
                .nth(1)
                .unwrap()
                .split('<')
                .next()
                .unwrap()
                .to_string()
        };
        let credentials = Credentials {
            key: tag("AccessKeyId"),
            secret: tag("SecretAccessKey"),
        };
        (server, credentials)
    }

    fn spawn(unsigned_actions: Option<u32>) -> Server {
        let moto = std::env::var_os("LVPIPE_MOTO")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(&std::env::var_os("HOME").expect("HOME")).join(".cache/lvpipe-moto")
            });
        assert!(
            moto.join("moto").is_dir(),
            "moto is not installed in {}: run scripts/install-deps.sh",
            moto.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("PYTHONPATH", &moto)
            .envs(unsigned_actions.map(|n| ("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs moto");
        let server = Server { child, port };
        super::wait_for_port(port, "moto");
        assert_eq!(
            server
                .client(Path::new("cache"))
                .request("PUT", "/bkt", &[])
                .0,
            200,
            "create bucket"
        );
        server
    }

    pub fn client(&self, cache: &Path) -> S3 {
        S3 {
            port: self.port,
            cache: cache.to_path_buf(),
        }
    }
}

impl S3 {
    /// One plain HTTP request to S3: status and body. moto wants an
    /// `Authorization` header for private objects but checks no signature
    /// (unless started with credentials).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        self.request_to("s3", method, path, body)
    }

    /// One plain HTTP request to one of moto's services (`s3`, `iam`: a
    /// form in the body).
    pub fn request_to(
        &self,
        service: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0\r\n\
             Connection: close\r\n\r\n",
            self.port,
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut body = response[split + 4..].to_vec();
        if head.contains("transfer-encoding: chunked") {
            let (mut out, mut rest) = (Vec::new(), &body[..]);
            loop {
                let line = rest.windows(2).position(|w| w == b"\r\n").unwrap();
                let size =
                    usize::from_str_radix(std::str::from_utf8(&rest[..line]).unwrap().trim(), 16)
                        .unwrap();
                if size == 0 {
                    break;
                }
                out.extend_from_slice(&rest[line + 2..line + 2 + size]);
                rest = &rest[line + 4 + size..];
            }
            body = out;
        }
        (status, body)
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.request("GET", &format!("/bkt/{key}"), &[]) {
            (200, body) => Some(body),
            (404, _) => None,
            (status, body) => panic!("GET {key}: {status} {}", String::from_utf8_lossy(&body)),
        }
    }

    pub fn put(&self, key: &str, body: &[u8]) {
        assert_eq!(self.request("PUT", &format!("/bkt/{key}"), body).0, 200);
    }

    pub fn delete(&self, key: &str) {
        assert_eq!(self.request("DELETE", &format!("/bkt/{key}"), &[]).0, 204);
    }

    /// `lvpipe ARGS` in `cwd` with the standard AWS variables set for this
    /// server.
    pub fn lvpipe(&self, cwd: &Path, args: &[&str]) -> Output {
        self.command(cwd, args).output().expect("lvpipe runs")
    }

    pub fn command(&self, cwd: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lvpipe"));
        c.args(args)
            .current_dir(cwd)
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            )
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("LVPIPE_CACHE", &self.cache);
        c
    }

    pub fn lvpipe_ok(&self, cwd: &Path, args: &[&str]) -> String {
        let out = self.lvpipe(cwd, args);
        assert!(
            out.status.success(),
            "lvpipe {args:?} failed ({:?}):\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
