// An HTTPS client for the Go TLS tests (standard library only): one keep-alive HTTP/1.1
// connection, the requests given as PATH:COUNT, then one JSON line with the statuses.
//
//	client [-wait] [-rate N] -ca CA.pem https://HOST:PORT PATH:COUNT ...
//
// With -wait it first prints {"ready": true} and waits for a line on stdin (the agent attaches
// its uprobes to the binary in the meantime); it always waits for a last line before exiting,
// so the agent sees the process alive while it handles the events. -rate paces the requests
// (at most N a second); the result line then also has the seconds they took.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	caFile := flag.String("ca", "", "CA certificate (PEM)")
	wait := flag.Bool("wait", false, "print ready and wait for a line before the requests")
	rate := flag.Int("rate", 0, "requests a second at most (0: as fast as they go)")
	flag.Parse()
	pem, err := ioutil.ReadFile(*caFile)
	if err != nil {
		fail(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	transport := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool},
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{}, // HTTP/1.1 only
		MaxIdleConnsPerHost: 1,
	}
	client := &http.Client{Transport: transport}
	stdin := bufio.NewReader(os.Stdin)
	if *wait {
		fmt.Println(`{"ready": true}`)
		if _, err := stdin.ReadString('\n'); err != nil {
			fail(err)
		}
	}
	args := flag.Args()
	base := args[0]
	statuses := map[string]int{}
	var tick <-chan time.Time
	if *rate > 0 {
		ticker := time.NewTicker(time.Second / time.Duration(*rate))
		defer ticker.Stop()
		tick = ticker.C
	}
	start := time.Now()
	for _, spec := range args[1:] {
		i := strings.LastIndex(spec, ":")
		n, err := strconv.Atoi(spec[i+1:])
		if err != nil {
			fail(err)
		}
		for j := 0; j < n; j++ {
			if tick != nil {
				<-tick
			}
			resp, err := client.Get(base + spec[:i])
			if err != nil {
				fail(err)
			}
			io.Copy(ioutil.Discard, resp.Body)
			resp.Body.Close()
			statuses[strconv.Itoa(resp.StatusCode)]++
		}
	}
	result := map[string]interface{}{"statuses": statuses}
	if *rate > 0 {
		result["seconds"] = time.Since(start).Seconds()
	}
	out, _ := json.Marshal(result)
	fmt.Println(string(out))
	stdin.ReadString('\n')
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
