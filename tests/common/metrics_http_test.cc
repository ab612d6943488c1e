// metrics_http::StopExposer: the endpoint serves until it is called, is gone
// after it (the port refuses connections), and a null exposer, a host that
// cannot be dialled or a bound address other than the wildcard all still
// stop it.
#include "common/metrics_http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "prometheus/registry.h"

namespace spear::metrics_http {
namespace {

// Whether a TCP connection to 127.0.0.1:port is accepted.
bool Accepts(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = connect(fd, reinterpret_cast<const sockaddr*>(&sa), sizeof(sa)) == 0;
  close(fd);
  return ok;
}

int PortOf(const prometheus::Exposer& e) {
  const auto ports = e.GetListeningPorts();
  return ports.empty() ? -1 : ports[0];
}

TEST(MetricsHttp, StopsServingTheEndpoint) {
  for (const std::string host : {"127.0.0.1", "0.0.0.0"}) {
    auto exposer = std::make_unique<prometheus::Exposer>(host + ":0");
    exposer->RegisterCollectable(std::make_shared<prometheus::Registry>());
    const int port = PortOf(*exposer);
    ASSERT_GT(port, 0) << host;
    EXPECT_TRUE(Accepts(port)) << host;
    StopExposer(exposer, host);
    EXPECT_EQ(exposer, nullptr) << host;
    EXPECT_FALSE(Accepts(port)) << host << ": still listening on " << port;
  }
}

TEST(MetricsHttp, NullAndUndiallableHostsAreFine) {
  std::unique_ptr<prometheus::Exposer> none;
  StopExposer(none, "127.0.0.1");
  EXPECT_EQ(none, nullptr);
  // Bound to loopback, named by a host the helper cannot dial as given (a
  // name): it dials 127.0.0.1, and the exposer is gone either way.
  auto exposer = std::make_unique<prometheus::Exposer>("127.0.0.1:0");
  const int port = PortOf(*exposer);
  ASSERT_GT(port, 0);
  StopExposer(exposer, "localhost");
  EXPECT_EQ(exposer, nullptr);
  EXPECT_FALSE(Accepts(port));
}

}  // namespace
}  // namespace spear::metrics_http
