// A stand-in for a program using rustls (tests/unit/test_tlsbin.py): compiled as a crate named
// `rustls`, so rustc's own mangling gives its Writer and Reader the symbol names the real
// crate's `<rustls::conn::Writer as std::io::Write>::write` and
// `<rustls::conn::Reader as std::io::Read>::read` have, in either mangling, in a second of
// rustc. No TLS in it: the real crate's programs (tests/system/workloads/rustls/) take minutes to
// build cold and are tested in tests/system/test_l7_rustls.py.
pub mod conn {
    use std::io;

    pub struct Writer {
        pub sent: Vec<u8>,
    }

    pub struct Reader {
        pub left: Vec<u8>,
    }

    impl io::Write for Writer {
        #[inline(never)]
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl io::Read for Reader {
        #[inline(never)]
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.left.len());
            buf[..n].copy_from_slice(&self.left[..n]);
            self.left.drain(..n);
            Ok(n)
        }
    }
}

fn main() {
    use std::io::{Read, Write};
    let mut w: Box<dyn Write> = Box::new(conn::Writer { sent: Vec::new() });
    w.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut r: Box<dyn Read> = Box::new(conn::Reader { left: b"HTTP/1.1 200 OK\r\n\r\n".to_vec() });
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    println!("{}", out.len());
}
