// AWS SDK for Go v2 probe for the end-to-end suite (Debian's golang-github-aws-aws-sdk-go-v2-dev, built
// by tests/e2e/setup.sh with GO111MODULE=off against /usr/share/gocode), run inside a pod's network
// namespace: config.LoadDefaultConfig's credential chain, then GetCallerIdentity at
// AWS_ENDPOINT_URL_STS (passed explicitly: this release does not read it). Prints one JSON line:
// {arn, account, user_id, provider, version} or {error, no_credentials, version}; exit 1 on error.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sts"
)

func emit(fields map[string]interface{}, code int) {
	fields["version"] = "aws-sdk-go-v2 " + aws.SDKVersion
	line, _ := json.Marshal(fields)
	fmt.Println(string(line))
	os.Exit(code)
}

func main() {
	ctx := context.Background()
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion("us-east-1"), config.WithRetryMaxAttempts(1))
	if err != nil {
		emit(map[string]interface{}{"error": "LoadDefaultConfig: " + err.Error(), "no_credentials": true}, 1)
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		emit(map[string]interface{}{"error": err.Error(), "no_credentials": true}, 1)
	}
	client := sts.NewFromConfig(cfg, func(o *sts.Options) {
		o.EndpointResolver = sts.EndpointResolverFromURL(os.Getenv("AWS_ENDPOINT_URL_STS"))
	})
	identity, err := client.GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
	if err != nil {
		emit(map[string]interface{}{"error": "GetCallerIdentity: " + err.Error(), "no_credentials": false}, 1)
	}
	emit(map[string]interface{}{
		"arn": aws.ToString(identity.Arn), "account": aws.ToString(identity.Account),
		"user_id": aws.ToString(identity.UserId), "provider": creds.Source,
	}, 0)
}
