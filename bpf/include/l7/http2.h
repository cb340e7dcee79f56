/* HTTP/2 (and gRPC over it): a connection is recognised by the client's preface, "PRI *
 * HTTP/2.0\r\n\r\nSM\r\n\r\n", written by the client first and read by the server first. From
 * then on the connection is a stream connection (contract.h): its frames go to user space. */
#ifndef COROOT_AGENT_L7_HTTP2_H
#define COROOT_AGENT_L7_HTTP2_H

static __always_inline int l7_http2_preface(u8 *b, u32 n) {
    return n >= 16 && b[0] == 'P' && b[1] == 'R' && b[2] == 'I' && b[3] == ' ' && b[4] == '*' && b[5] == ' ' &&
           b[6] == 'H' && b[7] == 'T' && b[8] == 'T' && b[9] == 'P' && b[10] == '/' && b[11] == '2' &&
           b[12] == '.' && b[13] == '0' && b[14] == '\r' && b[15] == '\n';
}

#endif
