//! The ceiling: the least an HTTP/1.1 server on this machine can do per request — a hyper server that
//! answers every request with a fixed body of the agent's size and the agent's headers, nothing else.
//!
//! It runs as its own process (this bench binary re-executed with `--serve-ceiling <bytes>`), on a
//! default multi-threaded tokio runtime like the agent's, so it competes with the load generator for
//! the same two cores exactly as the agent does. It exits when its standard input closes, so it never
//! outlives the bench. A `PUT` (the IMDSv2 token request) gets a 56-byte body, like the agent's token.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The flag that turns this binary into the ceiling server.
pub const FLAG: &str = "--serve-ceiling";

/// Serves until stdin closes with a body of `body_len` bytes; prints the port on stdout.
pub fn serve(body_len: usize) {
    std::thread::spawn(|| {
        // The parent holds our stdin; when it goes away, so do we.
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the ceiling");
        let port = listener.local_addr().expect("bound").port();
        println!("{port}");
        std::io::stdout().flush().expect("stdout");
        let body = Bytes::from(vec![b'x'; body_len]);
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                // A token request gets a token-sized answer, so IMDSv2 clients send realistic headers.
                let payload = if request.method() == Method::PUT {
                    Bytes::from_static(&[b't'; 56])
                } else {
                    body.clone()
                };
                let mut response = Response::new(Full::new(payload));
                let headers = response.headers_mut();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                headers.insert(header::SERVER, HeaderValue::from_static("EC2ws"));
                headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("none"));
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    })
}

/// A running ceiling process.
pub struct Ceiling {
    pub addr: SocketAddr,
    child: Child,
    _stdin: ChildStdin,
}

impl Ceiling {
    /// Starts the ceiling process with a body of `body_len` bytes and waits for its port.
    pub fn start(body_len: usize) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("own executable"))
            .args([FLAG, &body_len.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the ceiling process");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the ceiling prints its port within 10 s");
        let port: u16 = line.trim().parse().expect("the ceiling prints a port");
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            _stdin: stdin,
        }
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
