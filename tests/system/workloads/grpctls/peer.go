// A gRPC server or client over TLS for the Go gRPC test, built with Debian's grpc-go
// (golang-google-grpc-dev) in GOPATH mode. No generated code: the service is a hand-written
// ServiceDesc and messages are raw bytes (a codec named "raw", content-type application/grpc+raw).
//
//	peer server -cert CERT.pem -key KEY.pem ADDR
//	    /test.Svc/Unary answers "pong:"+request, or fails with grpc code N for a request "code:N";
//	    /test.Svc/Stream sends three messages.
//	peer client -ca CA.pem ADDR OK CODE:COUNT ...
//	    prints {"ready": true} and waits for a line on stdin (the agent attaches its uprobes in the
//	    meantime), then dials one connection and makes one server-streaming call and, eight at a
//	    time while the stream is open, OK good unary calls and COUNT failing ones for each grpc
//	    CODE (a number) on it; prints
//	    {"codes": {NAME: n, ...}, "stream_items": n} and waits for stdin to close before exiting.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "raw" }

func unary(_ interface{}, _ context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
	var req []byte
	if err := dec(&req); err != nil {
		return nil, err
	}
	if s := string(req); strings.HasPrefix(s, "code:") {
		n, _ := strconv.Atoi(s[5:])
		return nil, status.Error(codes.Code(n), "failed as asked")
	}
	resp := append([]byte("pong:"), req...)
	return &resp, nil
}

func stream(_ interface{}, ss grpc.ServerStream) error {
	var req []byte
	if err := ss.RecvMsg(&req); err != nil {
		return err
	}
	for i := 0; i < 3; i++ {
		item := []byte(fmt.Sprintf("item%d", i))
		if err := ss.SendMsg(&item); err != nil {
			return err
		}
	}
	return nil
}

var service = grpc.ServiceDesc{
	ServiceName: "test.Svc",
	HandlerType: (*interface{})(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Unary", Handler: unary}},
	Streams:     []grpc.StreamDesc{{StreamName: "Stream", Handler: stream, ServerStreams: true}},
}

func server(args []string) {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	certFile := fs.String("cert", "", "certificate (PEM)")
	keyFile := fs.String("key", "", "private key (PEM)")
	fs.Parse(args)
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		fail(err)
	}
	lis, err := net.Listen("tcp", fs.Arg(0))
	if err != nil {
		fail(err)
	}
	s := grpc.NewServer(grpc.Creds(credentials.NewServerTLSFromCert(&cert)))
	s.RegisterService(&service, struct{}{})
	if err := s.Serve(lis); err != nil {
		fail(err)
	}
}

func client(args []string) {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	caFile := fs.String("ca", "", "CA certificate (PEM)")
	fs.Parse(args)
	pem, err := os.ReadFile(*caFile)
	if err != nil {
		fail(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	stdin := bufio.NewReader(os.Stdin)
	fmt.Println(`{"ready": true}`)
	if _, err := stdin.ReadString('\n'); err != nil {
		fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, fs.Arg(0), grpc.WithBlock(),
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool})),
		grpc.WithDefaultCallOptions(grpc.CallContentSubtype("raw")))
	if err != nil {
		fail(err)
	}
	var requests []string
	ok, err := strconv.Atoi(fs.Arg(1))
	if err != nil {
		fail(err)
	}
	for i := 0; i < ok; i++ {
		requests = append(requests, fmt.Sprintf("x%d", i))
	}
	for _, spec := range fs.Args()[2:] {
		parts := strings.SplitN(spec, ":", 2)
		n, err := strconv.Atoi(parts[1])
		if err != nil {
			fail(err)
		}
		for i := 0; i < n; i++ {
			requests = append(requests, "code:"+parts[0])
		}
	}
	// the stream is opened first and read last: its messages cross the connection while the
	// unary calls, eight at a time, are in flight on it too
	st, err := conn.NewStream(ctx, &service.Streams[0], "/test.Svc/Stream")
	if err != nil {
		fail(err)
	}
	req := []byte("s")
	if err := st.SendMsg(&req); err != nil {
		fail(err)
	}
	if err := st.CloseSend(); err != nil {
		fail(err)
	}
	got := map[string]int{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	todo := make(chan string)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range todo {
				req, resp := []byte(r), []byte(nil)
				err := conn.Invoke(ctx, "/test.Svc/Unary", &req, &resp)
				mu.Lock()
				got[codeName(status.Code(err))]++
				mu.Unlock()
			}
		}()
	}
	for _, r := range requests {
		todo <- r
	}
	close(todo)
	wg.Wait()
	items := 0
	for {
		var item []byte
		if err := st.RecvMsg(&item); err != nil {
			break
		}
		items++
	}
	out, _ := json.Marshal(map[string]interface{}{"codes": got, "stream_items": items})
	fmt.Println(string(out))
	stdin.ReadString('\n')
	conn.Close()
}

// codeName is the code's name as in grpc's status codes list (OK, NOT_FOUND, ...).
func codeName(c codes.Code) string {
	names := map[codes.Code]string{codes.OK: "OK", codes.InvalidArgument: "INVALID_ARGUMENT",
		codes.NotFound: "NOT_FOUND", codes.PermissionDenied: "PERMISSION_DENIED",
		codes.Unavailable: "UNAVAILABLE", codes.Internal: "INTERNAL", codes.Unknown: "UNKNOWN"}
	if n, ok := names[c]; ok {
		return n
	}
	return c.String()
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func main() {
	encoding.RegisterCodec(rawCodec{})
	switch os.Args[1] {
	case "server":
		server(os.Args[2:])
	case "client":
		client(os.Args[2:])
	default:
		fail(fmt.Errorf("usage: peer server|client ..."))
	}
}
