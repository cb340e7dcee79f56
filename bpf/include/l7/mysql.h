/* MySQL/MariaDB client/server protocol: every packet is a 3-byte little-endian payload length, a
 * sequence number (0 for a command, which starts an exchange), then the payload; a command's
 * first byte is its code. Requests: COM_QUERY (3) and COM_STMT_PREPARE (0x16), followed by the
 * statement's text, and COM_STMT_EXECUTE (0x17): statement id (4 bytes), flags (1), iteration
 * count (4, always 1). Each is answered by OK, ERR, EOF or a result set. Not requests:
 * COM_STMT_CLOSE (0x19, which has no answer: a pending request would wait for the next one's),
 * COM_QUIT, COM_PING, COM_INIT_DB and the rest, and the handshake (its packets have seq > 0,
 * or, the server's greeting, protocol version 10 in place of a command).
 *
 * A client writes a whole packet at once: its length is the rest of the call. A server reads
 * the 4-byte header, then the payload into the same buffer (MariaDB's and MySQL's network
 * layer): that read is recognised bare, by its command and its first bytes — a statement's
 * text must hold no control byte (tabs and line ends aside; a MySQL 8 client's empty
 * query-attributes prefix, 0 and 1, may come before it) and an execute must carry the
 * iteration count 1. `ptr` is not needed: the first 16 bytes say it all. */
#ifndef COROOT_AGENT_L7_MYSQL_H
#define COROOT_AGENT_L7_MYSQL_H

#define L7_MYSQL_COM_QUERY 0x03
#define L7_MYSQL_COM_STMT_PREPARE 0x16
#define L7_MYSQL_COM_STMT_EXECUTE 0x17

/* A byte of a statement's text: printable (UTF-8 included), a tab or a line end. */
static __always_inline int l7_mysql_text(u8 c) {
    return c >= 0x20 ? c != 0x7f : (c == '\t' || c == '\n' || c == '\r');
}

/* A command's payload read alone by a server (its first n bytes in b, 2 <= n <= 16): an execute
 * with its iteration count, or a query or prepare whose first bytes are text. Straight-line
 * code with early returns: no loop for older verifiers, one path per outcome. */
static __always_inline int l7_mysql_payload(u8 *b, u32 n) {
    if (b[0] == L7_MYSQL_COM_STMT_EXECUTE)
        return n >= 10 && b[6] == 1 && b[7] == 0 && b[8] == 0 && b[9] == 0;
    if (b[0] != L7_MYSQL_COM_QUERY && b[0] != L7_MYSQL_COM_STMT_PREPARE)
        return 0;
    if (!(b[0] == L7_MYSQL_COM_QUERY && n >= 4 && b[1] == 0 && b[2] == 1)) { /* MySQL 8: no attributes */
        if (!l7_mysql_text(b[1]) || (n > 2 && !l7_mysql_text(b[2])))
            return 0;
    }
    if (n > 3 && !l7_mysql_text(b[3]))
        return 0;
    if (n > 4 && !l7_mysql_text(b[4]))
        return 0;
    if (n > 5 && !l7_mysql_text(b[5]))
        return 0;
    if (n > 6 && !l7_mysql_text(b[6]))
        return 0;
    if (n > 7 && !l7_mysql_text(b[7]))
        return 0;
    if (n > 8 && !l7_mysql_text(b[8]))
        return 0;
    if (n > 9 && !l7_mysql_text(b[9]))
        return 0;
    if (n > 10 && !l7_mysql_text(b[10]))
        return 0;
    if (n > 11 && !l7_mysql_text(b[11]))
        return 0;
    if (n > 12 && !l7_mysql_text(b[12]))
        return 0;
    if (n > 13 && !l7_mysql_text(b[13]))
        return 0;
    if (n > 14 && !l7_mysql_text(b[14]))
        return 0;
    return n <= 15 || l7_mysql_text(b[15]);
}

static __always_inline int l7_mysql_request(u8 *b, u32 n, u64 size, u64 ptr) {
    if (n < 2)
        return 0;
    if (n >= 5 && b[3] == 0 && ((u64)b[0] | ((u64)b[1] << 8) | ((u64)b[2] << 16)) + 4 == size) {
        /* a whole packet, as a client writes it: its length is the rest of the call */
        if (b[4] == L7_MYSQL_COM_STMT_EXECUTE)
            return n >= 14 && b[10] == 1 && b[11] == 0 && b[12] == 0 && b[13] == 0;
        return (b[4] == L7_MYSQL_COM_QUERY || b[4] == L7_MYSQL_COM_STMT_PREPARE) && size >= 6;
    }
    return l7_mysql_payload(b, n);
}

#endif
