// An HTTPS client and server over rustls for the rustls tests: std::net::TcpStream and
// rustls::StreamOwned, HTTP/1.1 written and parsed by hand (no other crate).
//
//   rustls-peer client [--wait] [--rate N] CA.pem HOST:PORT SERVER-NAME PATH:COUNT ...
//       one keep-alive connection, COUNT GETs of each PATH in turn, then one JSON line with the
//       statuses ({"statuses": {"200": 5, "404": 3}}, and "seconds" with --rate). With --wait it
//       first prints {"ready": true} and waits for a line on stdin (the agent attaches its
//       uprobes in the meantime); it always waits for a last line before exiting.
//   rustls-peer server CERT.pem KEY.pem ADDR
//       GET /missing -> 404, anything else -> 200 "hello\n"; a thread per connection.
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fail(msg: String) -> ! {
    eprintln!("{}", msg);
    std::process::exit(1)
}

fn pem_items(path: &str) -> Vec<rustls_pemfile::Item> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| fail(format!("{}: {}", path, e)));
    rustls_pemfile::read_all(&mut BufReader::new(f)).unwrap_or_else(|e| fail(format!("{}: {}", path, e)))
}

/// One HTTP/1.1 message head and body from `stream` (body by Content-Length): (first line, body).
fn read_message<S: Read>(stream: &mut S, pending: &mut Vec<u8>) -> io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_string();
            let mut length = 0usize;
            for line in head.split("\r\n").skip(1) {
                if let Some((name, value)) = line.split_once(':') {
                    if name.trim().eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            while pending.len() < end + 4 + length {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
                }
                pending.extend_from_slice(&buf[..n]);
            }
            let body = pending[end + 4..end + 4 + length].to_vec();
            pending.drain(..end + 4 + length);
            let first = head.split("\r\n").next().unwrap_or("").to_string();
            return Ok(Some((first, body)));
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

fn client(args: &[String]) {
    let mut wait = false;
    let mut rate = 0u64;
    let mut i = 0;
    while i < args.len() && args[i].starts_with("--") {
        match args[i].as_str() {
            "--wait" => wait = true,
            "--rate" => {
                i += 1;
                rate = args[i].parse().unwrap_or_else(|_| fail("--rate N".into()));
            }
            other => fail(format!("unknown option {}", other)),
        }
        i += 1;
    }
    let rest = &args[i..];
    if rest.len() < 3 {
        fail("client [--wait] [--rate N] CA.pem HOST:PORT SERVER-NAME PATH:COUNT ...".into());
    }
    let mut roots = rustls::RootCertStore::empty();
    for item in pem_items(&rest[0]) {
        if let rustls_pemfile::Item::X509Certificate(der) = item {
            roots.add(&rustls::Certificate(der)).unwrap_or_else(|e| fail(format!("CA: {:?}", e)));
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_safe_defaults()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::ServerName::try_from(rest[2].as_str()).unwrap_or_else(|_| fail("server name".into()));
    let stdin = io::stdin();
    let mut line = String::new();
    if wait {
        println!("{{\"ready\": true}}");
        io::stdout().flush().ok();
        stdin.lock().read_line(&mut line).ok();
    }
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap_or_else(|e| fail(format!("{}", e)));
    let sock = TcpStream::connect(&rest[1]).unwrap_or_else(|e| fail(format!("{}: {}", rest[1], e)));
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut statuses: Vec<(String, u64)> = Vec::new();
    let mut pending = Vec::new();
    let start = Instant::now();
    let mut sent = 0u64;
    for spec in &rest[3..] {
        let (path, count) = spec.rsplit_once(':').unwrap_or_else(|| fail(format!("PATH:COUNT, not {}", spec)));
        let count: u64 = count.parse().unwrap_or_else(|_| fail(format!("PATH:COUNT, not {}", spec)));
        for _ in 0..count {
            if rate > 0 {
                let due = Duration::from_micros(sent * 1_000_000 / rate);
                let now = start.elapsed();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            let request = format!("GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rustls-peer\r\n\r\n", path, rest[2]);
            tls.write_all(request.as_bytes()).unwrap_or_else(|e| fail(format!("write: {}", e)));
            sent += 1;
            let (first, _) = match read_message(&mut tls, &mut pending) {
                Ok(Some(m)) => m,
                Ok(None) => fail("connection closed".into()),
                Err(e) => fail(format!("read: {}", e)),
            };
            let status = first.split(' ').nth(1).unwrap_or("?").to_string();
            match statuses.iter_mut().find(|(s, _)| *s == status) {
                Some(entry) => entry.1 += 1,
                None => statuses.push((status, 1)),
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let counts: Vec<String> = statuses.iter().map(|(s, n)| format!("\"{}\": {}", s, n)).collect();
    let mut out = format!("{{\"statuses\": {{{}}}", counts.join(", "));
    if rate > 0 {
        out += &format!(", \"seconds\": {}", seconds);
    }
    println!("{}}}", out);
    io::stdout().flush().ok();
    line.clear();
    stdin.lock().read_line(&mut line).ok();
}

fn serve(config: Arc<rustls::ServerConfig>, sock: TcpStream) {
    let conn = match rustls::ServerConnection::new(config) {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut pending = Vec::new();
    while let Ok(Some((first, _))) = read_message(&mut tls, &mut pending) {
        let path = first.split(' ').nth(1).unwrap_or("/");
        let response: &[u8] = if path == "/missing" {
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nnot found\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n"
        };
        if tls.write_all(response).is_err() {
            return;
        }
    }
}

fn server(args: &[String]) {
    if args.len() != 3 {
        fail("server CERT.pem KEY.pem ADDR".into());
    }
    let mut certs = Vec::new();
    for item in pem_items(&args[0]) {
        if let rustls_pemfile::Item::X509Certificate(der) = item {
            certs.push(rustls::Certificate(der));
        }
    }
    let key = pem_items(&args[1])
        .into_iter()
        .find_map(|item| match item {
            rustls_pemfile::Item::PKCS8Key(der) | rustls_pemfile::Item::RSAKey(der) | rustls_pemfile::Item::ECKey(der) => {
                Some(rustls::PrivateKey(der))
            }
            _ => None,
        })
        .unwrap_or_else(|| fail(format!("{}: no private key", args[1])));
    let config = rustls::ServerConfig::builder()
        .with_safe_defaults()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap_or_else(|e| fail(format!("{}", e)));
    let config = Arc::new(config);
    let listener = TcpListener::bind(&args[2]).unwrap_or_else(|e| fail(format!("{}: {}", args[2], e)));
    println!("{{\"listening\": \"{}\"}}", listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
    io::stdout().flush().ok();
    for sock in listener.incoming().flatten() {
        let config = config.clone();
        std::thread::spawn(move || serve(config, sock));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(|s| s.as_str()) {
        Some("client") => client(&args[2..]),
        Some("server") => server(&args[2..]),
        _ => fail("rustls-peer client|server ...".into()),
    }
}
