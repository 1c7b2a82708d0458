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

impl Server {
    pub fn start() -> Server {
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
    /// One plain HTTP request: status and body. moto wants an
    /// `Authorization` header for private objects but checks no signature.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\n\
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
