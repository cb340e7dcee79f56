/* HTTP/1.x: a request starts with a method and a space; a response with "HTTP/1.x NNN".
 * The methods are agent/l7/http.py METHODS (the contract test runs this detector natively
 * on that module's samples). */
#ifndef COROOT_AGENT_L7_HTTP_H
#define COROOT_AGENT_L7_HTTP_H

/* The first four bytes of each method, little-endian. */
static __always_inline int l7_http_request(u8 *b, u32 n) {
    if (n < 5)
        return 0;
    u32 w = *(u32 *)b;
    if (w == 0x4e4e4f43 /* CONN */) /* CONNECT host:port; not NATS's CONNECT {options} */
        return n >= 9 && b[4] == 'E' && b[5] == 'C' && b[6] == 'T' && b[7] == ' ' && b[8] != '{';
    return w == 0x20544547 /* "GET " */ || w == 0x54534f50 /* POST */ || w == 0x20545550 /* "PUT " */ ||
           w == 0x44414548 /* HEAD */ || w == 0x454c4544 /* DELE */ || w == 0x43544150 /* PATC */ ||
           w == 0x4954504f /* OPTI */ || w == 0x43415254 /* TRAC */;
}

/* "HTTP/1.x NNN": 1..5 for the status class, 0 when it is not a status line. */
static __always_inline u32 l7_http_status(u8 *b, u32 n) {
    if (n < 12 || b[0] != 'H' || b[1] != 'T' || b[2] != 'T' || b[3] != 'P' || b[4] != '/' || b[8] != ' ')
        return 0;
    if (b[9] < '1' || b[9] > '5' || b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9')
        return 0;
    return b[9] - '0';
}

#endif
