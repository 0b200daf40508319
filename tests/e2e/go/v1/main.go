// AWS SDK for Go v1 probe for the end-to-end suite (Debian's golang-github-aws-aws-sdk-go-dev, built by
// tests/e2e/setup.sh with GO111MODULE=off against /usr/share/gocode), run inside a pod's network
// namespace: the default credential chain (session.NewSession), then GetCallerIdentity at
// AWS_ENDPOINT_URL_STS (passed explicitly: this release does not read it). Prints one JSON line:
// {arn, account, user_id, provider, version} or {error, no_credentials, version}; exit 1 on error.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/aws/aws-sdk-go/aws"
	"github.com/aws/aws-sdk-go/aws/session"
	"github.com/aws/aws-sdk-go/service/sts"
)

func emit(fields map[string]interface{}, code int) {
	fields["version"] = aws.SDKVersion
	line, _ := json.Marshal(fields)
	fmt.Println(string(line))
	os.Exit(code)
}

func main() {
	sess, err := session.NewSession(&aws.Config{
		Region:     aws.String("us-east-1"),
		MaxRetries: aws.Int(0),
		// The chain's error then says why each provider failed, not only that all did.
		CredentialsChainVerboseErrors: aws.Bool(true),
	})
	if err != nil {
		emit(map[string]interface{}{"error": "NewSession: " + err.Error(), "no_credentials": true}, 1)
	}
	creds, err := sess.Config.Credentials.Get()
	if err != nil {
		emit(map[string]interface{}{"error": err.Error(), "no_credentials": true}, 1)
	}
	client := sts.New(sess, &aws.Config{Endpoint: aws.String(os.Getenv("AWS_ENDPOINT_URL_STS"))})
	identity, err := client.GetCallerIdentity(&sts.GetCallerIdentityInput{})
	if err != nil {
		emit(map[string]interface{}{"error": "GetCallerIdentity: " + err.Error(), "no_credentials": false}, 1)
	}
	emit(map[string]interface{}{
		"arn": aws.StringValue(identity.Arn), "account": aws.StringValue(identity.Account),
		"user_id": aws.StringValue(identity.UserId), "provider": creds.ProviderName,
	}, 0)
}
