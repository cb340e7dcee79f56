/* An HTTPS client with OpenSSL linked in statically (built by tests/system/test_l7_tls_static.py
 * against Debian's libssl.a and libcrypto.a): the process maps no libssl.so, as a Node.js
 * build that bundles OpenSSL or Envoy does not.
 *
 * usage: ssl_static_client HOST PORT CAFILE PATH:COUNT...
 * Connects once (keep-alive), prints {"ready": true}, waits for a line on stdin, makes COUNT
 * GET requests to each PATH in turn over the one connection (SSL_write, then SSL_read until
 * the response's Content-Length is read), prints {"200": n, "404": m, ...} as one JSON line,
 * waits for stdin to close and exits. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[1 << 16];

/* One response: its status; -1 on error. */
static int response(SSL *ssl) {
    size_t have = 0;
    char *end = NULL;
    while (!(end = strstr(buf, "\r\n\r\n"))) {
        int n = SSL_read(ssl, buf + have, (int)(sizeof(buf) - 1 - have));
        if (n <= 0)
            return -1;
        have += (size_t)n;
        buf[have] = 0;
    }
    int status = atoi(buf + 9);
    const char *cl = strcasestr(buf, "\r\ncontent-length:");
    long body = cl ? atol(cl + 17) : 0;
    size_t head = (size_t)(end + 4 - buf);
    long left = body - (long)(have - head);
    while (left > 0) {
        int n = SSL_read(ssl, buf, left < (long)sizeof(buf) - 1 ? (int)left : (int)sizeof(buf) - 1);
        if (n <= 0)
            return -1;
        left -= n;
    }
    buf[0] = 0;
    return status;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s HOST PORT CAFILE PATH:COUNT...\n", argv[0]);
        return 2;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx || SSL_CTX_load_verify_locations(ctx, argv[3], NULL) != 1)
        goto fail;
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("connect");
        return 1;
    }
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1)
        goto fail;
    printf("{\"ready\": true}\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof(line), stdin))
        return 0;
    int statuses[600] = {0};
    for (int a = 4; a < argc; a++) {
        char path[256];
        int count = 0;
        const char *colon = strrchr(argv[a], ':');
        if (!colon || colon - argv[a] >= (long)sizeof(path))
            return 2;
        memcpy(path, argv[a], (size_t)(colon - argv[a]));
        path[colon - argv[a]] = 0;
        count = atoi(colon + 1);
        for (int i = 0; i < count; i++) {
            char req[512];
            int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: ssl-static\r\n\r\n", path,
                             argv[1]);
            if (SSL_write(ssl, req, n) != n)
                goto fail;
            int status = response(ssl);
            if (status < 100 || status >= 600)
                goto fail;
            statuses[status]++;
        }
    }
    printf("{");
    const char *sep = "";
    for (int s = 0; s < 600; s++)
        if (statuses[s]) {
            printf("%s\"%d\": %d", sep, s, statuses[s]);
            sep = ", ";
        }
    printf("}\n");
    fflush(stdout);
    while (fgets(line, sizeof(line), stdin))
        ;
    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);
    SSL_CTX_free(ctx);
    return 0;
fail:
    ERR_print_errors_fp(stderr);
    return 1;
}
