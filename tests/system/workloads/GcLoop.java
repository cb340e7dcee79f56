// A JVM workload for the JVM metric tests: allocates (1-4 MiB that stay live until the next
// round) and calls System.gc() for the number of seconds given, then prints what its own
// GarbageCollectorMXBeans say, and waits for stdin to close. Output: one JSON line when
// started, one when done.
import java.io.InputStream;
import java.lang.management.GarbageCollectorMXBean;
import java.lang.management.ManagementFactory;

public class GcLoop {
    static volatile byte[][] keep;

    public static void main(String[] args) throws Exception {
        double seconds = Double.parseDouble(args[0]);
        System.out.println("{\"event\": \"started\", \"pid\": " + ProcessHandle.current().pid()
                + ", \"java_version\": \"" + System.getProperty("java.version") + "\"}");
        System.out.flush();
        long end = System.nanoTime() + (long) (seconds * 1e9);
        int rounds = 0;
        while (System.nanoTime() < end) {
            byte[][] k = new byte[16 + (rounds % 48)][];  // a live set that changes between collections
            for (int i = 0; i < k.length; i++) {
                k[i] = new byte[64 * 1024];
            }
            keep = k;
            System.gc();
            rounds++;
            Thread.sleep(20);
        }
        StringBuilder gcs = new StringBuilder();
        long total = 0;
        long count = 0;
        for (GarbageCollectorMXBean b : ManagementFactory.getGarbageCollectorMXBeans()) {
            if (gcs.length() > 0) {
                gcs.append(", ");
            }
            gcs.append('"').append(b.getName()).append("\": ").append(b.getCollectionTime());
            total += b.getCollectionTime();
            count += b.getCollectionCount();
        }
        System.out.println("{\"event\": \"done\", \"rounds\": " + rounds + ", \"gc_count\": " + count
                + ", \"gc_total_ms\": " + total + ", \"gc_ms\": {" + gcs + "}}");
        System.out.flush();
        InputStream in = System.in;
        while (in.read() >= 0) {
            // until the test closes stdin
        }
    }
}
